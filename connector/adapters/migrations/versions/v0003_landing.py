"""Landing in AWS: one landing per run, one EBS snapshot per landed disk (every AWS
resource id is written here before anything depends on it), and a job's landing
settings.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "landings",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("server_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("image_name", sa.String(128), nullable=False),
        sa.Column("image_id", sa.String(64)),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.String(32), nullable=False),
        sa.Column("finished_at", sa.String(32)),
        sa.Column("error", sa.Text),
    )
    op.create_index("ix_landings_server_id", "landings", ["server_id"])
    op.create_table(
        "landed_disks",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("disk_key", sa.Integer, primary_key=True),
        sa.Column("snapshot_id", sa.String(64)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("client_token", sa.String(64), nullable=False),
        sa.Column("parent_snapshot_id", sa.String(64)),
        sa.Column("capacity", sa.BigInteger, nullable=False),
        sa.Column("blocks_sent", sa.BigInteger, nullable=False, server_default="0"),
    )
    with op.batch_alter_table("jobs") as t:
        t.add_column(sa.Column("landing", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as t:
        t.drop_column("landing")
    op.drop_table("landed_disks")
    op.drop_index("ix_landings_server_id", "landings")
    op.drop_table("landings")
