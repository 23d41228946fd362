"""The bench command in its tiny --quick mode: every contender runs on the same small
disks, once, and the three reports (JSON, Markdown, PNG) hold every one of them with
plausible numbers. The full bench is run by hand (bench/README.md), never in CI;
nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024
CONTENDERS = {
    "connector (local transport)",
    "connector (vCenter sim, CBT)",
    "restic",
    "rclone",
    "boto3 upload_file",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return out, proc.stdout


def test_the_json_holds_every_contender_on_both_targets_with_plausible_fields(
    quick_run: tuple[Path, str],
) -> None:
    out, _ = quick_run
    result = json.loads((out / "result.json").read_text())
    rows = result["results"]
    assert {r["contender"] for r in rows} == CONTENDERS
    lanes = {(r["contender"], r["target"]) for r in rows}
    assert ("boto3 upload_file", "s3") in lanes and ("boto3 upload_file", "dir") not in lanes
    for contender in CONTENDERS - {"boto3 upload_file"}:
        assert {(contender, "dir"), (contender, "s3")} <= lanes
    scenarios = {r["scenario"] for r in rows}
    assert any(s.startswith("full") for s in scenarios)
    assert any(s.startswith("incremental") for s in scenarios)
    assert any(s.startswith("sparse") for s in scenarios)
    assert any(s.startswith("dense") for s in scenarios)
    data = result["mixed_disk"]["data_bytes"]
    assert 0.4 * result["mixed_disk"]["capacity"] < data < 0.8 * result["mixed_disk"]["capacity"]
    for row in rows:
        m = row["median"]
        assert len(row["repetitions"]) == 1
        assert 0 < m["wall_s"] < 600, row
        assert m["source_mib_s"] > 0 and m["cpu_s"] > 0, row
        assert 5 < m["peak_rss_mib"] < 2048, row
        assert m["bytes_read"] > 0, row
        assert m["bytes_uploaded"] >= 0, row
        if row["scenario"].startswith("full"):
            assert m["bytes_uploaded"] > 0, row
    by_lane = {(r["scenario"], r["contender"], r["target"]): r for r in rows}
    (full,) = [s for s in scenarios if s.startswith("full")]
    for target in ("dir", "s3"):
        # The connector reads what the image holds, holes skipped; the peers read it all.
        connector = by_lane[(full, "connector (local transport)", target)]["median"]
        assert connector["bytes_read"] == data
        assert (
            by_lane[(full, "rclone", target)]["median"]["bytes_read"]
            == (result["mixed_disk"]["capacity"])
        )
        # rclone sends the whole file again after a change, where the connector and
        # restic send only new data.
        capacity = result["mixed_disk"]["capacity"]
        rclone_inc = by_lane[("incremental 1 (2%)", "rclone", target)]["median"]
        assert rclone_inc["bytes_uploaded"] == capacity
        connector_inc = by_lane[("incremental 1 (2%)", "connector (local transport)", target)]
        assert 0 < connector_inc["median"]["bytes_uploaded"] < capacity / 4
        # With CBT, an incremental reads exactly the changed blocks.
        inc = by_lane[("incremental 1 (2%)", "connector (vCenter sim, CBT)", target)]
        assert inc["median"]["bytes_read"] == inc["changed_bytes"] > 0


def test_concurrency_discovery_and_limits_are_measured(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    result = json.loads((out / "result.json").read_text())
    conc = result["concurrency"]
    modes = [k for k, v in conc.items() if isinstance(v, dict)]
    assert len(modes) == 2 and any("20 ms" in m for m in modes)
    for mode in modes:
        assert conc[mode]["one_after_another_s"] > 0 and conc[mode]["at_once_s"] > 0
    disc = result["discovery"]["median"]
    assert disc["vms"] == 50 and disc["disks"] >= 50 and disc["wall_s"] > 0
    kernels = result["limits"]["kernels_1mib_blocks"]
    assert set(kernels) == {"hmac-sha256", "zstd3-text", "zstd3-random", "aes256-gcm"}
    for k in kernels.values():
        assert k["per_core_mib_s"] > 0 and k["all_cores_mib_s"] > 0
    assert result["limits"]["read_image_to_null"]["mib_s"] > 0
    names = {t["target"] for t in result["targets"]}
    assert any(n.startswith("full run to a local directory") for n in names)
    assert any(n.startswith("discovery of 50 VMs") for n in names)
    assert all(t["met"] in (True, False) for t in result["targets"])


def test_the_markdown_table_and_the_png_chart(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    md = (out / "results.md").read_text()
    assert md.startswith("# Bench results (quick")
    for contender in CONTENDERS:
        assert f"| {contender} -> " in md
    assert "## Targets" in md and "## Discovery" in md and "## The machine's limits" in md
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert "reports in" in stdout and "full run to a local directory" in stdout
