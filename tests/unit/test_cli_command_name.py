"""The command a `connector` command line names, as the audit log records it."""

from __future__ import annotations

from connector.cli.common import command_name


def test_the_command_is_the_first_word_after_the_global_options() -> None:
    assert command_name(["vms"]) == "vms"
    assert command_name(["--config", "/etc/c.toml", "--json", "runs", "web-01"]) == "runs"
    assert command_name(["-c", "c.toml", "jobs", "list"]) == "jobs"
    assert command_name(["--config=c.toml", "verify"]) == "verify"
    assert command_name(["--json"]) == ""
