"""Records: consumers, the billing ledger, generated images.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

The column types are written out here (not imported from handler.records.db) so that this revision stays what it was
when later revisions change the tables.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_MYSQL = ("mysql", "mariadb")
_opts = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mariadb_engine": "InnoDB",
         "mariadb_charset": "utf8mb4"}


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)


def _id() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "consumers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=True),
        sa.Column("key_prefix", sa.String(16), nullable=True),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_consumers"),
        sa.UniqueConstraint("key_hash", name="uq_consumers_key_hash"),
        **_opts,
    )
    op.create_table(
        "ledger",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("invocation_id", sa.String(128), nullable=True),
        sa.Column("instance_id", sa.String(128), nullable=True),
        sa.Column("mode", sa.String(16), nullable=True),
        sa.Column("checkpoint", sa.String(255), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("steps", sa.Integer(), nullable=True),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(128), nullable=True),
        sa.Column("queue_wait_ms", sa.Float(), nullable=True),
        sa.Column("model_load_ms", sa.Float(), nullable=True),
        sa.Column("generation_ms", sa.Float(), nullable=True),
        sa.Column("encode_ms", sa.Float(), nullable=True),
        sa.Column("total_ms", sa.Float(), nullable=True),
        sa.Column("billed_ms", sa.BigInteger(), nullable=False),
        sa.Column("price_per_second", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(8), nullable=False),
        sa.Column("amount_nanos", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=False),
        sa.Column("finished_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_ledger"),
        sa.UniqueConstraint("consumer", "request_id", name="uq_ledger_consumer_request_id"),
        **_opts,
    )
    op.create_index("ix_ledger_finished_at", "ledger", ["finished_at"])
    op.create_table(
        "generated_images",
        sa.Column("id", _id(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("prompt", sa.Text().with_variant(mysql.MEDIUMTEXT(), *_MYSQL), nullable=False),
        sa.Column("negative_prompt", sa.Text().with_variant(mysql.MEDIUMTEXT(), *_MYSQL), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sa.String(64), nullable=False),
        sa.Column("cfg_scale", sa.Float(), nullable=False),
        sa.Column("size", sa.String(16), nullable=False),
        sa.Column("model_hash", sa.String(64), nullable=True),
        sa.Column("model", sa.String(255), nullable=True),
        sa.Column("image_base64", sa.Text().with_variant(mysql.LONGTEXT(), *_MYSQL), nullable=True),
        sa.Column("image_url", sa.String(1024), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_generated_images"),
        sa.ForeignKeyConstraint(["consumer", "request_id"], ["ledger.consumer", "ledger.request_id"],
                                name="fk_generated_images_ledger", ondelete="CASCADE"),
        **_opts,
    )
    op.create_index("ix_generated_images_consumer_created_at", "generated_images", ["consumer", "created_at"])
    op.create_index("ix_generated_images_request_id", "generated_images", ["request_id"])


def downgrade() -> None:
    op.drop_table("generated_images")
    op.drop_table("ledger")
    op.drop_table("consumers")
