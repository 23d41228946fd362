"""The `connector` command's own options and output, met as a user meets them."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from connector import __version__
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import MiB, disk_sha, flip_byte, objects, packs, write_blocks

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def test_version_prints_the_version_and_exits_0(env: ConnectorEnv) -> None:
    proc = env.cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == __version__
    assert "Missing command" not in proc.stderr


def test_config_and_json_work_before_and_after_the_command(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    vcsim.add_vm("ergo-global-opts", [8 * MiB])
    bad = tmp_path / "missing.toml"
    cases: list[tuple[str, ...]] = [
        ("--config", str(env.config_file), "vms"),
        ("vms", "--config", str(env.config_file)),
        # the command's own option wins over the one before it
        ("--config", str(bad), "vms", "--config", str(env.config_file)),
    ]
    for args in cases:
        proc = env.cli(*args, env={"CONNECTOR_CONFIG": str(bad)})
        assert proc.returncode == 0, (args, proc.stderr)
        assert "ergo-global-opts" in proc.stdout, args
    proc = env.cli("--config", str(bad), "vms")
    assert proc.returncode == 2
    assert str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    # without --config, $CONNECTOR_CONFIG is read as before
    assert env.cli("vms").returncode == 0
    cases = [("--json", "vms"), ("vms", "--json")]
    for args in cases:
        proc = env.cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        rows = json.loads(proc.stdout)
        assert "ergo-global-opts" in [r["name"] for r in rows], args
    cases = [("--json", "jobs", "list"), ("jobs", "list", "--json")]
    for args in cases:
        proc = env.cli(*args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert json.loads(proc.stdout) == [], args


def test_json_before_a_command_without_json_is_refused(env: ConnectorEnv) -> None:
    proc = env.cli("--json", "bucket-policy")
    assert proc.returncode == 2
    assert "`connector bucket-policy` has no --json option" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ids_are_never_cut_at_80_columns_or_piped(env: ConnectorEnv, vcsim: Any, moto: Any) -> None:
    name = "ergo-a-vm-with-a-rather-long-name-for-the-table"
    uuid = vcsim.add_vm(name, [4 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {0: random.Random(80).randbytes(MiB)})
    assert env.cli("replicate", name).returncode == 0
    (run,) = env.cli_json("runs", name)
    job = env.cli_json(
        "jobs", "create", name, "--frequency", "12", "-d", "a description long enough to wrap"
    )
    server_id = run["server_id"]
    tables = [
        (("runs",), run["id"]),
        (("runs", name), run["id"]),
        (("jobs", "list"), job["id"]),
        (("jobs", "show", name), job["id"]),
        (("vms",), uuid),
        (("retention",), server_id),
    ]
    for columns in ("80", ""):  # "": no $COLUMNS, output to a pipe
        for args, wanted in tables:
            proc = env.cli(*args, env={"COLUMNS": columns})
            assert proc.returncode == 0, (args, proc.stderr)
            assert wanted in proc.stdout, (columns, args, proc.stdout)
            assert "…" not in proc.stdout, (columns, args, proc.stdout)
    (pack,) = packs(moto, env.bucket)
    (pack_object,) = [k for k in objects(moto, env.bucket) if k.endswith(pack)]
    flip_byte(moto, env.bucket, pack_object, 1000)
    for columns in ("80", ""):
        proc = env.cli("verify", name, "--deep", env={"COLUMNS": columns})
        assert proc.returncode == 1, proc.stderr
        table = proc.stdout.split("verify:")[0]
        assert run["id"] in table, (columns, proc.stdout)


def test_run_latest_is_the_last_completed_run_and_runs_filters(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    rng = random.Random(4)
    name = "ergo-latest"
    uuid = vcsim.add_vm(name, [4 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    shas = []
    for _ in range(2):
        write_blocks(vcsim, uuid, key, {1: rng.randbytes(MiB)})
        assert env.cli("replicate", name).returncode == 0
        shas.append(disk_sha(vcsim, uuid, key))
    first, second = env.cli_json("runs", name)
    assert [first["state"], second["state"]] == ["COMPLETED", "COMPLETED"]

    out = tmp_path / "latest.img"
    res = env.cli_json("restore", name, "--run", "latest", "--disk", str(key), "--to", str(out))
    assert res["run"] == second["id"] and res["sha256"] == shas[1]
    text = env.cli(
        "restore", name, "--run", "latest", "--disk", str(key), "--to", str(tmp_path / "t.img")
    )
    assert text.returncode == 0, text.stderr
    assert f"of run {second['id']} to" in text.stdout
    report = env.cli_json("verify", name, "--run", "latest")
    assert report["runs"] == 1 and report["faults"] == []
    dry = env.cli("purge", name, "--drop-run", "latest", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would delete run {second['id']}" in dry.stdout

    # --last and --state
    assert [r["id"] for r in env.cli_json("runs", name, "--last", "1")] == [second["id"]]
    assert [r["id"] for r in env.cli_json("runs", "--last", "10000", "--state", "completed")] == [
        first["id"],
        second["id"],
    ]
    assert env.cli_json("runs", name, "--state", "FAILED") == []
    table = env.cli("runs", name, "--last", "1")
    assert table.returncode == 0
    assert second["id"] in table.stdout and first["id"] not in table.stdout


def test_run_latest_without_a_completed_run_and_bad_filters_are_refused(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    name = "ergo-never-replicated"
    vcsim.add_vm(name, [4 * MiB])
    assert env.cli("vms").returncode == 0
    proc = env.cli(
        "restore", name, "--run", "latest", "--disk", "2000", "--to", str(tmp_path / "x")
    )
    assert proc.returncode == 1
    assert f"--run latest: {name} has no COMPLETED run" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = env.cli("verify", name, "--run", "latest")
    assert proc.returncode == 1
    assert f"{name} has no COMPLETED run" in proc.stderr
    proc = env.cli("verify", "--run", "latest")
    assert proc.returncode == 2
    assert "--run latest needs the VM" in proc.stderr
    for args, message in (
        (("--last", "0"), "--last must be 1 to 10000 runs, not 0"),
        (("--last", "10001"), "--last must be 1 to 10000 runs, not 10001"),
        (("--state", "DONE"), "--state 'DONE' is not a run state; use one of PENDING, MISSED"),
    ):
        proc = env.cli("runs", *args)
        assert proc.returncode == 2, args
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_section_names_show_literally_in_help_and_check(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    libdir = tmp_path / "no-vddk-here"
    extra = f'[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = "{libdir}"\n'
    env = write_config(tmp_path / "connector", vcsim, moto, s3_bucket, extra=extra)
    proc = env.cli("retention", "--help")
    assert proc.returncode == 0
    assert "use [retention] keep" in proc.stdout
    proc = env.cli("check", "--only", "transport.vddk")
    assert proc.returncode == 1
    assert "point [transport.vddk] libdir at it" in proc.stdout.replace("\n", " ")
