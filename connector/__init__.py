"""Incremental, verifiable replication of vSphere VM disks into S3."""

__version__ = "0.1.0"
