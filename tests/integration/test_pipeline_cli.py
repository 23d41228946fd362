"""The transfer pipeline through the `connector` command: a VM of two disks replicated
with several pack uploads in flight to moto_server over TLS, restored byte for byte,
verified; and a [pipeline] setting out of range refused with a clear message."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.pipeline import file_sha
from tests.integration.test_transport_cli import cli, ok_json, s3_section

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def mixed_image(path: Path, size: int, seed: int) -> None:
    """Random blocks, text-like blocks and holes, 1 MiB each."""
    rng = random.Random(seed)
    words = [rng.randbytes(3).hex() for _ in range(200)]
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(size // MiB):
            kind = i % 3
            if kind == 2:
                continue  # a hole
            block = (
                rng.randbytes(MiB)
                if kind == 0
                else " ".join(rng.choice(words) for _ in range(MiB // 5)).encode()[:MiB]
            )
            f.seek(i * MiB)
            f.write(block)


def write_config(tmp_path: Path, moto: Any, bucket: str, pipeline: str) -> Path:
    config = tmp_path / "connector.toml"
    config.write_text(
        s3_section(moto, bucket, tmp_path)
        + '[state]\npath = "state/state.db"\n'
        + '[transport]\nkind = "local"\nmax_request = 2097152\n'
        + "[daemon]\nmax_disks_per_vm = 2\n"
        + pipeline
        + '[[local.vms]]\nname = "kvm-db"\nquiescent = true\n'
        + '[[local.vms.disks]]\npath = "vda.img"\n'
        + '[[local.vms.disks]]\npath = "vdb.img"\n'
    )
    return config


def test_cli_replicates_with_uploads_in_flight_and_restores_exactly(
    tmp_path: Path, moto: Any, s3_bucket: str
) -> None:
    mixed_image(tmp_path / "vda.img", 24 * MiB, seed=1)
    mixed_image(tmp_path / "vdb.img", 15 * MiB, seed=2)
    config = write_config(
        tmp_path,
        moto,
        s3_bucket,
        "[pipeline]\nworkers = 2\nreads_in_flight = 3\nuploads_in_flight = 3\n"
        "pack_size = 1048576\nzstd_level = 3\n",
    )
    run1 = ok_json(config, "replicate", "kvm-db")
    assert run1["state"] == "COMPLETED"
    disks = {d["disk_key"]: d for d in run1["disks"]}
    assert disks[2000]["bytes_read"] == 16 * MiB and disks[2001]["bytes_read"] == 10 * MiB
    # one pack per stored MiB or so: many uploads, several at once
    assert disks[2000]["packs"] >= 8 and disks[2001]["packs"] >= 5
    # random blocks are stored raw (not larger), text-like ones compressed
    assert disks[2000]["bytes_uploaded"] < 16 * MiB
    expected1 = {
        key: file_sha(tmp_path / name) for key, name in ((2000, "vda.img"), (2001, "vdb.img"))
    }

    fd = os.open(tmp_path / "vda.img", os.O_WRONLY)
    os.pwrite(fd, random.Random(3).randbytes(3 * MiB), 6 * MiB + 100)  # into a hole too
    os.close(fd)
    run2 = ok_json(config, "replicate", "kvm-db")
    by_key = {d["disk_key"]: d for d in run2["disks"]}
    assert by_key[2000]["mode"] == "compare" and by_key[2000]["blocks_new"] == 4
    assert by_key[2001]["blocks_new"] == 0

    for run, shas in ((run1, expected1), (run2, None)):
        for key, name in ((2000, "vda.img"), (2001, "vdb.img")):
            out = tmp_path / f"restored-{run['id']}-{key}.img"
            res = ok_json(
                config,
                "restore",
                "kvm-db",
                "--run",
                run["id"],
                "--disk",
                str(key),
                "--to",
                str(out),
            )
            want = shas[key] if shas is not None else file_sha(tmp_path / name)
            assert res["sha256"] == want
            out.unlink()
    verify = cli(config, "verify", "kvm-db")
    assert verify.returncode == 0, verify.stderr


def test_cli_refuses_a_pipeline_setting_out_of_range(
    tmp_path: Path, moto: Any, s3_bucket: str
) -> None:
    mixed_image(tmp_path / "vda.img", 2 * MiB, seed=4)
    mixed_image(tmp_path / "vdb.img", 2 * MiB, seed=5)
    config = write_config(tmp_path, moto, s3_bucket, "[pipeline]\nuploads_in_flight = 0\n")
    proc = cli(config, "replicate", "kvm-db")
    assert proc.returncode == 2
    assert "pipeline.uploads_in_flight" in proc.stderr
    assert "greater than or equal to 1" in proc.stderr
