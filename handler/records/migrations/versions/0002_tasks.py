"""Asynchronous generation tasks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MYSQL = ("mysql", "mariadb")
_opts = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mariadb_engine": "InnoDB",
         "mariadb_charset": "utf8mb4"}


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)


def upgrade() -> None:
    long_text = sa.Text().with_variant(mysql.LONGTEXT(), *_MYSQL)
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("tag", sa.String(128), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request_json", long_text, nullable=False),
        sa.Column("result_json", long_text, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("callback_url", sa.String(2048), nullable=True),
        sa.Column("callback_status", sa.String(64), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("runner", sa.String(64), nullable=True),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.Column("started_at", _timestamp(), nullable=True),
        sa.Column("finished_at", _timestamp(), nullable=True),
        sa.Column("heartbeat_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tasks"),
        sa.UniqueConstraint("consumer", "request_id", name="uq_tasks_consumer_request_id"),
        **_opts,
    )
    op.create_index("ix_tasks_status_heartbeat_at", "tasks", ["status", "heartbeat_at"])


def downgrade() -> None:
    op.drop_table("tasks")
