"""The connector CLI, as a process, with the local, nbd and vddk transports configured
in a TOML file, and moto_server over TLS as the store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from typer.testing import CliRunner

from connector.app import App
from connector.cli import app as cli_app
from connector.config import load_config
from tests.harness.connector_env import _toml, write_config
from tests.harness.nbd import NbdServer, need, start_nbdkit, write_sparse_image
from tests.harness.pipeline import file_sha

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def s3_section(moto: Any, bucket: str, workdir: Path) -> str:
    secret = workdir / "s3-secret"
    secret.write_text(moto.secret_key + "\n")
    secret.chmod(0o600)
    values = {
        "bucket": bucket,
        "prefix": "replicas",
        "region": moto.region,
        "endpoint_url": moto.endpoint_url,
        "ca_file": str(moto.ca_file),
        "access_key_id": moto.access_key,
        "secret_access_key_file": str(secret),
    }
    return "[s3]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


@pytest.fixture
def in_process_cli() -> Any:
    """typer's runner; the CLI configures logging to the runner's stream, so the
    logging configuration is put back afterwards."""
    saved = structlog.get_config()
    try:
        yield CliRunner()
    finally:
        structlog.configure(**saved)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONNECTOR_CONFIG=str(config), COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )


def ok_json(config: Path, *args: str) -> Any:
    proc = cli(config, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("kind", ["local", "nbd"])
def test_cli_replicates_and_restores_a_local_vm(
    kind: str, tmp_path: Path, moto: Any, s3_bucket: str, nbd_servers: list[NbdServer]
) -> None:
    image = tmp_path / "vda.img"
    write_sparse_image(image, 8 * MiB, [(MiB, 2 * MiB)], seed=21)
    if kind == "nbd":
        need("nbdkit")
        server = start_nbdkit(image, tmp_path / "srv")
        nbd_servers.append(server)
        disk = f"nbd = {_toml(server.uri)}"
    else:
        disk = 'path = "vda.img"'  # relative to the config file
    config = tmp_path / "connector.toml"
    config.write_text(
        s3_section(moto, s3_bucket, tmp_path)
        + '[state]\npath = "state/state.db"\n'
        + f'[transport]\nkind = "{kind}"\n'
        + '[[local.vms]]\nname = "kvm-web"\nquiescent = true\n'
        + f"[[local.vms.disks]]\n{disk}\n"
    )
    (vm,) = ok_json(config, "vms")
    assert vm["name"] == "kvm-web" and vm["disks"][0]["capacity"] == 8 * MiB
    run1 = ok_json(config, "replicate", "kvm-web")
    expected1 = file_sha(image)
    fd = os.open(image, os.O_WRONLY)
    os.pwrite(fd, b"changed" * 100, 2 * MiB + 5)
    os.close(fd)
    run2 = ok_json(config, "replicate", "kvm-web")
    assert [d["mode"] for d in run1["disks"] + run2["disks"]] == ["full", "compare"]
    assert run1["disks"][0]["bytes_read"] == 2 * MiB  # holes skipped
    assert run2["disks"][0]["blocks_new"] == 1
    out = tmp_path / "restored.img"
    res = ok_json(
        config, "restore", "kvm-web", "--run", run2["id"], "--disk", "2000", "--to", str(out)
    )
    assert res["sha256"] == file_sha(image) != expected1
    assert out.stat().st_size == 8 * MiB


def test_cli_rejects_a_config_whose_transport_does_not_fit(
    tmp_path: Path, in_process_cli: CliRunner
) -> None:
    config = tmp_path / "connector.toml"
    config.write_text('[s3]\nbucket = "b-1-2"\n[transport]\nkind = "local"\n')
    result = in_process_cli.invoke(cli_app, ["vms", "--config", str(config)])
    assert result.exit_code == 2
    # the message keeps its [section] names (they are not taken for markup)
    assert "[transport] kind = 'local' reads the VMs of [local]" in result.stderr
    assert "at least one [[local.vms]]" in result.stderr


def test_check_says_vddk_is_missing_and_replicate_refuses_before_any_snapshot(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    libdir = tmp_path / "vmware-vix-disklib-distrib"
    extra = f'[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = {_toml(str(libdir))}\n'
    env = write_config(tmp_path / "connector", vcsim, moto, s3_bucket, extra=extra)
    proc = env.cli("check", "--only", "transport.vddk")
    assert proc.returncode == 1
    assert "VDDK is missing" in proc.stdout and str(libdir) in proc.stdout.replace("\n", "")
    results = {r["name"]: r for r in json.loads(env.cli("check", "--json").stdout)}
    vddk = results["transport.vddk"]
    assert vddk["status"] == "failed"
    assert any(d.startswith("vddk: VDDK library: fail") for d in vddk["details"])
    assert any(d.startswith("vddk: nbdkit: ok") for d in vddk["details"])

    uuid = vcsim.add_vm("vddk-missing", [4 * MiB])
    proc = env.cli("replicate", "vddk-missing")
    assert proc.returncode == 2
    assert "the vddk transport cannot run" in proc.stderr and "connector check" in proc.stderr
    assert vcsim.snapshot_names(uuid) == []
    app = App(load_config(env.config_file))
    try:
        assert app.state.runs() == []
    finally:
        app.close()


def test_check_passes_with_nothing_to_check(tmp_path: Path, in_process_cli: CliRunner) -> None:
    image = tmp_path / "vda.img"
    write_sparse_image(image, MiB, [])
    config = tmp_path / "connector.toml"
    config.write_text(
        '[s3]\nbucket = "b-1-2"\n[transport]\nkind = "local"\n'
        f'[state]\npath = "{tmp_path / "state" / "state.db"}"\n'
        '[[local.vms]]\nname = "v"\nquiescent = true\n[[local.vms.disks]]\npath = "vda.img"\n'
    )
    result = in_process_cli.invoke(
        cli_app, ["check", "--only", "transport.vddk", "--config", str(config)]
    )
    assert result.exit_code == 0, result.stderr
    assert "skipped" in result.stdout and "transport is 'local'" in result.stdout


def test_replicate_with_vddk_and_a_password_in_the_environment_refuses_before_any_snapshot(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str
) -> None:
    """VDDK reads the password from a file (password=+FILE), so password_env cannot serve
    it: the run is refused as a config fault, before VDDK is looked for or a snapshot made,
    and without the password in what it prints."""
    libdir = tmp_path / "vmware-vix-disklib-distrib"  # absent: the refusal comes first
    extra = f'[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = {_toml(str(libdir))}\n'
    env = write_config(
        tmp_path / "connector",
        vcsim,
        moto,
        s3_bucket,
        vcenter={"password_file": None, "password_env": "CONNECTOR_TEST_VC_PASSWORD"},
        extra=extra,
    )
    password = vcsim.password_file.read_text().strip()
    uuid = vcsim.add_vm("vddk-env-password", [4 * MiB])
    proc = env.cli("replicate", "vddk-env-password", env={"CONNECTOR_TEST_VC_PASSWORD": password})
    assert proc.returncode == 2, proc.stderr
    assert (
        "the vddk transport hands the vCenter password to nbdkit as a file (password=+FILE): "
        "set [vcenter] password_file (a file or credential:NAME) instead of password_env"
    ) in " ".join(proc.stderr.split())
    assert "the vddk transport cannot run" not in proc.stderr
    assert password not in proc.stdout + proc.stderr
    assert vcsim.snapshot_names(uuid) == []
