"""Fleet mode: members and their heartbeats, leases (the scheduler's leadership,
the purge guard), the claim of a run's current stage, the owner of a multipart
upload, one run per schedule slot, the history of stages and the shared job queue.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "members",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("capabilities", sa.Text, nullable=False),
        sa.Column("started_at", sa.String(32), nullable=False),
        sa.Column("heartbeat", sa.Float, nullable=False),
        sa.Column("stopped", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(128), nullable=False),
        sa.Column("expires", sa.Float, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
    )
    op.create_table(
        "stage_log",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False, index=True),
        sa.Column("server_id", sa.String(40), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("member", sa.String(128), nullable=False),
        sa.Column("started", sa.Float, nullable=False),
        sa.Column("ended", sa.Float),
        sa.Column("outcome", sa.String(16)),
    )
    op.create_table(
        "queue_tasks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("priority", sa.Float, nullable=False, server_default="0"),
    )
    op.create_index("ix_queue_tasks_queue", "queue_tasks", ["queue", "priority", "id"])
    op.create_table(
        "queue_schedule",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
    )
    op.create_index("ix_queue_schedule_queue", "queue_schedule", ["queue", "ts"])
    op.create_table(
        "queue_kv",
        sa.Column("queue", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(255), primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )
    with op.batch_alter_table("run_control") as t:
        t.add_column(sa.Column("owner", sa.String(128)))
        t.add_column(sa.Column("owner_since", sa.Float))
        t.add_column(sa.Column("due_at", sa.Float))
    with op.batch_alter_table("side_effects") as t:
        t.add_column(sa.Column("owner", sa.String(128)))
    with op.batch_alter_table("runs") as t:
        t.add_column(sa.Column("schedule_key", sa.String(128)))
    op.create_index("ix_runs_schedule_key", "runs", ["schedule_key"], unique=True)
