"""Shared pytest wiring: fixture plugins from tests/harness (the simulator's first:
the S3 fixtures reuse its test CA), and the recorder of error messages that checks
docs/troubleshooting.md (tests/messages/plugin.py)."""

pytest_plugins = [
    "tests.harness.fixtures_vcsim",
    "tests.harness.fixtures_s3",
    "tests.harness.fixtures_landing",
    "tests.harness.fixtures_tls",
    "tests.harness.nbd",
    "tests.messages.plugin",
    "tests.harness.postgres",
]
