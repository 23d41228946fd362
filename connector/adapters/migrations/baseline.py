"""The schema as version 0.1.0 created it, before migrations: revision 0001's tables.

Frozen: later changes go into new revisions, never here. A state file made before
migrations existed is brought to this baseline (missing tables and columns added,
as 0.1.0 itself did when it opened one) and then stamped 0001.
"""

import sqlalchemy as sa


def baseline_metadata() -> sa.MetaData:
    """A new MetaData holding the 0.1.0 tables."""
    md = sa.MetaData()
    sa.Table(
        "servers",
        md,
        sa.Column("id", sa.String(40), primary_key=True),  # opaque, used in object keys
        sa.Column("vm_uuid", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("ref", sa.String(64), nullable=False),
        sa.Column("datacenter", sa.Text, nullable=False),
        sa.Column("power_state", sa.String(32), nullable=False),
        sa.Column("cbt_enabled", sa.Boolean, nullable=False),
        sa.Column("disks", sa.Text, nullable=False),  # JSON
        sa.Column("snapshots", sa.Text, nullable=False),  # JSON
        sa.Column("seen_at", sa.String(32), nullable=False),
        sa.Column("removed_at", sa.String(32)),
    )

    sa.Table(
        "disk_state",
        md,
        sa.Column("server_id", sa.String(40), primary_key=True),
        sa.Column("disk_key", sa.Integer, primary_key=True),
        sa.Column("disk_uuid", sa.String(64)),
        sa.Column("capacity", sa.BigInteger, nullable=False),
        sa.Column("change_id", sa.String(128)),
        sa.Column("last_run_id", sa.String(64), nullable=False),
        sa.Column("chain_length", sa.Integer, nullable=False, default=0),
    )

    sa.Table(
        "runs",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("server_id", sa.String(40), nullable=False, index=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("started_at", sa.String(32), nullable=False),
        sa.Column("finished_at", sa.String(32)),
        sa.Column("error", sa.Text),
        sa.Column("snapshot_name", sa.String(128)),
        sa.Column("snapshot_ref", sa.String(64)),
        sa.Column("stats", sa.Text, nullable=False, default="{}"),
    )

    sa.Table(
        "run_disks",
        md,
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("disk_key", sa.Integer, primary_key=True),
        sa.Column(
            "mode", sa.String(16), nullable=False
        ),  # incremental | full | allocated | compare
        sa.Column("reason", sa.Text),
        sa.Column("capacity", sa.BigInteger, nullable=False),
        sa.Column("change_id_from", sa.String(128)),
        sa.Column("change_id_to", sa.String(128)),
        sa.Column("bytes_changed", sa.BigInteger, nullable=False, default=0),
        sa.Column("bytes_read", sa.BigInteger, nullable=False, default=0),
        sa.Column("bytes_uploaded", sa.BigInteger, nullable=False, default=0),
        sa.Column("blocks_new", sa.Integer, nullable=False, default=0),
        sa.Column("blocks_dedup", sa.Integer, nullable=False, default=0),
        sa.Column("blocks_zero", sa.Integer, nullable=False, default=0),
        sa.Column("manifest_key", sa.Text),
        sa.Column("disk_uuid", sa.String(64)),
        sa.Column("pack_bytes", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("packs", sa.Integer, nullable=False, server_default="0"),
        sa.Column("chain", sa.Integer, nullable=False, server_default="0"),
        sa.Column("merkle_root", sa.String(64)),
    )

    sa.Table(
        "blocks",
        md,
        sa.Column("block_id", sa.LargeBinary(32), primary_key=True),
        sa.Column("pack_id", sa.String(64), nullable=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("length", sa.Integer, nullable=False),
    )

    sa.Table(
        "packs",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("created_at", sa.String(32), nullable=False),
    )

    sa.Table(
        "retention",
        md,
        sa.Column("server_id", sa.String(40), primary_key=True),
        sa.Column("keep", sa.Integer, nullable=False),  # most recent runs to keep; 0 keeps all
        sa.Column("updated_at", sa.String(32), nullable=False),
    )

    # The run ledger (connector.adapters.ledger).
    sa.Table(
        "run_control",
        md,
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("job_id", sa.String(40), index=True),
        sa.Column("seq", sa.Integer, nullable=False, default=0),
        sa.Column("attempts", sa.Integer, nullable=False, default=0),
        sa.Column("host", sa.Text),
        sa.Column("failed_stage", sa.String(32)),
        sa.Column("failure", sa.Text),
        sa.Column("progress_done", sa.BigInteger, nullable=False, default=0),
        sa.Column("progress_total", sa.BigInteger, nullable=False, default=0),
        sa.Column("detail", sa.Text, nullable=False, default=""),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )

    sa.Table(
        "run_steps",
        md,
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("stage", sa.String(32), primary_key=True),
        sa.Column("disk_key", sa.Integer, primary_key=True),  # -1: the step is not per disk
        sa.Column("result", sa.Text, nullable=False),  # JSON
        sa.Column("done_at", sa.String(32), nullable=False),
    )

    sa.Table(
        "side_effects",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), index=True),
        sa.Column("kind", sa.String(16), nullable=False),  # snapshot | multipart
        sa.Column("target", sa.Text, nullable=False),  # VM instance UUID | object key
        sa.Column("name", sa.Text),  # snapshot name
        sa.Column("ref", sa.Text),  # snapshot ref | multipart upload id
        sa.Column("detail", sa.Text, nullable=False, default="{}"),  # JSON (snapshot disks)
        sa.Column("state", sa.String(16), nullable=False),  # pending | undone | done
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
    )

    # Replication jobs (connector.adapters.jobstore).
    sa.Table(
        "jobs",
        md,
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("server_id", sa.String(40), nullable=False, index=True),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False, default=False),
        sa.Column("seed_time", sa.String(40), nullable=False),  # ISO 8601, UTC
        sa.Column("frequency_hours", sa.Integer),  # NULL: run once
        sa.Column("retention", sa.Integer, nullable=False),
        sa.Column("description", sa.Text, nullable=False, default=""),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
        sa.Column("message", sa.Text, nullable=False, default=""),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("updated_at", sa.String(32), nullable=False),
        # Retention owed after a completed run, until it is applied (NULL: none owed).
        sa.Column("retention_due", sa.String(40)),  # since when (microseconds: also a token)
        sa.Column("retention_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retention_next_at", sa.String(40)),  # the next try, ISO 8601 UTC
        sa.Column("retention_error", sa.Text),  # why the last try failed
    )
    return md
