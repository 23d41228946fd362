"""The schema of 0.1.0: catalog, disk states, runs, block index, packs, retention,
the run ledger and jobs.

Revision ID: 0001
Revises:
"""

from alembic import op

from connector.adapters.migrations.baseline import baseline_metadata

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    baseline_metadata().create_all(op.get_bind())
