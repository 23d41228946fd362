"""A replica store in a local directory ([store] kind = "local"), through the `connector`
command as a process: replicate, verify and restore byte for byte, `connector check` and
`connector status` naming the directory, and clear errors for a bad path or a directory
the connector may not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import _toml
from tests.harness.nbd import write_sparse_image
from tests.harness.pipeline import file_sha

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def cli(config: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`connector ARGS` as a process; `prefix` runs it under another program (setpriv)."""
    env = dict(os.environ, CONNECTOR_CONFIG=str(config), COLUMNS="200")
    return subprocess.run(
        [*prefix, sys.executable, "-m", "connector", *args],
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


def write_local_config(workdir: Path, store: Path | str, image: Path) -> Path:
    config = workdir / "connector.toml"
    config.write_text(
        f'[store]\nkind = "local"\npath = {_toml(str(store))}\n'
        f"[state]\npath = {_toml(str(workdir / 'state' / 'state.db'))}\n"
        '[transport]\nkind = "local"\n'
        '[[local.vms]]\nname = "drill-01"\nquiescent = true\n'
        f"[[local.vms.disks]]\npath = {_toml(str(image))}\n"
    )
    return config


def test_replicates_to_a_directory_and_restores_byte_for_byte(tmp_path: Path) -> None:
    image = tmp_path / "vda.img"
    write_sparse_image(image, 16 * MiB, [(MiB, 3 * MiB), (9 * MiB, MiB)], seed=5)
    store = tmp_path / "replicas"
    config = write_local_config(tmp_path, "replicas", image)  # relative to the config file

    checks = {r["name"]: r for r in json.loads(cli(config, "check", "--json").stdout)}
    assert checks["store.directory"]["status"] == "ok", checks["store.directory"]
    assert str(store) in checks["store.directory"]["summary"]
    assert "GiB free" in checks["store.directory"]["summary"]
    assert checks["s3.permissions"]["status"] == "skipped"
    assert "local directory" in checks["s3.permissions"]["summary"]

    run1 = ok_json(config, "replicate", "drill-01")
    first = file_sha(image)
    fd = os.open(image, os.O_WRONLY)
    os.pwrite(fd, os.urandom(64 * 1024), 10 * MiB)
    os.close(fd)
    run2 = ok_json(config, "replicate", "drill-01")
    assert run2["disks"][0]["blocks_new"] >= 1
    # Packs, manifests and commits are plain files below the directory.
    assert any(p.is_file() for p in (store / "packs").rglob("*"))
    assert (store / "config").is_file()

    for run, sha in ((run1, first), (run2, file_sha(image))):
        out = tmp_path / f"restored-{run['id']}.img"
        res = ok_json(
            config, "restore", "drill-01", "--run", run["id"], "--disk", "2000", "--to", str(out)
        )
        assert res["sha256"] == sha == file_sha(out)
        assert out.stat().st_size == 16 * MiB
    verified = cli(config, "verify", "drill-01", "--run", run2["id"])
    assert verified.returncode == 0, verified.stderr

    status = json.loads(cli(config, "status", "--json").stdout)
    assert status["s3"]["reachable"] is True
    assert status["s3"]["target"] == f"the directory {store.as_uri()}"
    assert status["s3"]["name"] == "replica store"
    human = cli(config, "status").stdout
    assert f"store    reachable (the directory {store.as_uri()})" in human


def test_a_store_path_that_is_a_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    image = tmp_path / "vda.img"
    write_sparse_image(image, 4 * MiB, [(0, MiB)], seed=6)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store should be\n")
    config = write_local_config(tmp_path, blocker, image)
    proc = cli(config, "replicate", "drill-01")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"the replica store directory ([store] path) {blocker} is not a directory" in (
        proc.stderr
    )
    assert blocker.read_text() == "a file where the store should be\n"  # untouched

    below = blocker / "replicas"
    config = write_local_config(tmp_path, below, image)
    proc = cli(config, "replicate", "drill-01")
    assert proc.returncode == 2
    assert f"cannot create the replica store directory ([store] path) {below}" in proc.stderr
    assert "or choose another path" in proc.stderr


# Root ignores file modes; without CAP_DAC_OVERRIDE it is held to them like any user
# (util-linux's setpriv, always installed on Debian).
WITHOUT_OVERRIDE = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
    "--",
)


def test_a_directory_the_connector_may_not_write_fails_before_the_run(tmp_path: Path) -> None:
    image = tmp_path / "vda.img"
    write_sparse_image(image, 4 * MiB, [(0, MiB)], seed=7)
    store = tmp_path / "replicas"
    store.mkdir(mode=0o555)  # read-only for everyone, its owner included
    config = write_local_config(tmp_path, store, image)
    try:
        proc = cli(config, "replicate", "drill-01", prefix=WITHOUT_OVERRIDE)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"the replica store directory ([store] path) {store} is not writable" in proc.stderr
        assert "give the connector's user write access to it" in proc.stderr
        assert list(store.iterdir()) == []  # nothing written, no probe left behind
        runs = ok_json(config, "runs", "drill-01")
        assert [r["state"] for r in runs] in ([], ["FAILED"])  # no run half-made

        check = cli(config, "check", "--only", "store.directory", "--json", prefix=WITHOUT_OVERRIDE)
        assert check.returncode == 1
        (result,) = json.loads(check.stdout)
        assert result["status"] == "failed" and "is not writable" in result["summary"]
    finally:
        store.chmod(0o755)
