"""The PAI-EAS queue service: input and sink indexes of tasks, their tags, and task progress.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_MYSQL = ("mysql", "mariadb")
_opts = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mariadb_engine": "InnoDB",
         "mariadb_charset": "utf8mb4"}


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), *_MYSQL)


def _index() -> sa.types.TypeEngine:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("queue", sa.String(255), nullable=True))
        batch.add_column(sa.Column("tags_json", sa.Text(), nullable=True))
        batch.add_column(sa.Column("progress_json", sa.Text(), nullable=True))
    op.create_index("ix_tasks_status_runner_created_at", "tasks", ["status", "runner", "created_at"])
    op.create_table(
        "queue_inputs",
        sa.Column("idx", _index(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name="pk_queue_inputs"),
        sa.UniqueConstraint("task_id", name="uq_queue_inputs_task_id"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_queue_inputs_tasks", ondelete="CASCADE"),
        **_opts,
    )
    op.create_table(
        "queue_sink",
        sa.Column("idx", _index(), autoincrement=True, nullable=False),
        sa.Column("task_id", sa.String(32), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("committed", sa.Boolean(), nullable=False),
        sa.Column("created_at", _timestamp(), nullable=False),
        sa.PrimaryKeyConstraint("idx", name="pk_queue_sink"),
        sa.UniqueConstraint("task_id", name="uq_queue_sink_task_id"),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_queue_sink_tasks", ondelete="CASCADE"),
        **_opts,
    )
    op.create_index("ix_queue_sink_queue_committed_idx", "queue_sink", ["queue", "committed", "idx"])
    locks = op.create_table(
        "queue_locks",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("taken", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_queue_locks"),
        **_opts,
    )
    op.bulk_insert(locks, [{"name": "sink", "taken": 0}])


def downgrade() -> None:
    op.drop_table("queue_locks")
    op.drop_table("queue_sink")
    op.drop_table("queue_inputs")
    op.drop_index("ix_tasks_status_runner_created_at", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("progress_json")
        batch.drop_column("tags_json")
        batch.drop_column("queue")
