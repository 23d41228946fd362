"""Progress of the long commands, as a user sees it on a terminal and in a pipe.

On a terminal: one bar per disk with bytes, rate and ETA, log lines above the
bars on their own lines (never written into a bar's line), and a summary with
the duration and the throughput. In a pipe: plain log lines and the summary,
without a single control sequence.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.terminal import TerminalRun, run_in_terminal
from tests.integration.store_helpers import MiB, write_blocks

pytestmark = pytest.mark.integration

# 1 MiB reads: each disk's three written blocks are three reads, so its bar is
# drawn under way (with an ETA) before it is drawn finished.
EXTRA = '[transport]\nmax_request = 1048576\n\n[log]\nlevel = "info"\n'
BAR = "━"
SIZE = r"\d+(?:\.\d)? (?:B|KiB|MiB|GiB)"
UNDER_WAY = re.compile(rf"^disk (\d+) .*{BAR}.* {SIZE}/3\.0 MiB +{SIZE}/s +ETA \d+:\d\d:\d\d")
FINISHED = re.compile(rf"^disk (\d+) {BAR}+ 3\.0 MiB/3\.0 MiB +{SIZE}/s +done in \d+\.\d s")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z \[(?:info|warning|error) *\] ")


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket, extra=EXTRA)


def terminal(env: ConnectorEnv, *args: str) -> TerminalRun:
    environ = {**os.environ, "CONNECTOR_CONFIG": str(env.config_file)}
    run = run_in_terminal([sys.executable, "-m", "connector", *args], environ)
    assert run.returncode == 0, run.text()
    return run


def vm_with_data(vcsim: Any, name: str, seed: int) -> tuple[str, list[int]]:
    uuid = vcsim.add_vm(name, [8 * MiB, 8 * MiB])
    keys = list(vcsim.disk_keys(uuid))
    change(vcsim, uuid, keys, seed)
    return uuid, keys


def change(vcsim: Any, uuid: str, keys: list[int], seed: int) -> None:
    rng = random.Random(seed)
    for key in keys:
        write_blocks(vcsim, uuid, key, {i: rng.randbytes(MiB) for i in (0, 3, 6)})


def assert_logs_never_in_a_bar(run: TerminalRun) -> None:
    """At no moment does a screen line hold both a log line and a bar."""
    for frame in run.frames():
        for line in frame:
            if LOG_LINE.match(line) or "[info" in line:
                assert BAR not in line and "ETA" not in line and "done in" not in line, line


def test_replicate_on_a_terminal_shows_bytes_rate_eta_per_disk_and_a_summary(
    env: ConnectorEnv, vcsim: Any
) -> None:
    name = "progress-tty"
    _uuid, keys = vm_with_data(vcsim, name, 1)
    run = terminal(env, "replicate", name)

    under_way = {int(m[1]) for f in run.frames() for line in f if (m := UNDER_WAY.match(line))}
    assert under_way == set(keys), "\n".join(run.final())
    final = run.final()
    finished = [i for i, line in enumerate(final) if FINISHED.match(line)]
    assert {int(FINISHED.match(final[i])[1]) for i in finished} == set(keys)  # type: ignore[index]
    summary = [line for line in final if line.startswith("replicated ")]
    assert len(summary) == 1, final
    assert re.fullmatch(
        rf"replicated {name} \(2 disks\): read 6\.0 MiB in \d+\.\d s \({SIZE}/s\); "
        r"stored 6\.0 MiB",
        summary[0],
    ), summary
    assert any(re.match(r"run r-\S+ COMPLETED$", line) for line in final)

    # A log line the run emits while the bars are live (the snapshot's removal,
    # in the cleanup stage) is printed on its own line, above the bars.
    removed = [i for i, line in enumerate(final) if "vcenter.snapshot_removed" in line]
    assert removed and LOG_LINE.match(final[removed[0]]), final
    raw = run.raw.decode()
    assert raw.index(BAR) < raw.index("vcenter.snapshot_removed"), "logged before any bar"
    assert removed[0] < min(finished)
    assert_logs_never_in_a_bar(run)


def test_restore_verify_and_purge_on_a_terminal_show_progress_and_a_summary(
    env: ConnectorEnv, vcsim: Any, tmp_path: Path
) -> None:
    name = "progress-tty-store"
    uuid, keys = vm_with_data(vcsim, name, 2)
    assert env.cli("replicate", name).returncode == 0
    change(vcsim, uuid, keys, 3)  # the second run replaces every block: run 1's packs go
    assert env.cli("replicate", name).returncode == 0

    image = tmp_path / "disk.img"
    restored = terminal(
        env, "restore", name, "--run", "latest", "--disk", str(keys[0]), "--to", str(image)
    )
    final = restored.final()
    assert any(
        re.match(rf"restore disk {keys[0]} {BAR}+ 3\.0 MiB/3\.0 MiB +{SIZE}/s +done in", line)
        for line in final
    ), final
    assert any(
        re.fullmatch(
            rf"restored disk {keys[0]} of {name}: wrote 3\.0 MiB in \d+\.\d s \({SIZE}/s\)", line
        )
        for line in final
    ), final
    assert image.stat().st_size == 8 * MiB
    assert_logs_never_in_a_bar(restored)

    verified = terminal(env, "verify", name)
    final = verified.final()
    assert any(
        re.match(rf"verify {BAR}+ 12\.0 MiB/12\.0 MiB +{SIZE}/s +done in", line) for line in final
    ), final
    assert any(
        re.fullmatch(rf"verified 2 runs: read {SIZE} in \d+\.\d s \({SIZE}/s\)", line)
        for line in final
    ), final
    assert_logs_never_in_a_bar(verified)

    purged = terminal(env, "purge", name, "--keep", "1")
    final = purged.final()
    assert any(
        re.match(rf"delete packs {BAR}+ ({SIZE})/\1 +{SIZE}/s +done in", line) for line in final
    ), final
    assert any(
        re.fullmatch(rf"purge: deleted 2 packs, {SIZE} in \d+\.\d s \({SIZE}/s\)", line)
        for line in final
    ), final
    assert_logs_never_in_a_bar(purged)


def test_without_a_terminal_progress_is_plain_log_lines_and_a_summary(
    env: ConnectorEnv, vcsim: Any
) -> None:
    name = "progress-pipe"
    _uuid, keys = vm_with_data(vcsim, name, 4)
    proc = env.cli("replicate", name)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\x1b" not in proc.stdout
    assert BAR not in proc.stderr
    lines = proc.stderr.splitlines()
    assert all(LOG_LINE.match(line) or line.startswith("replicated ") for line in lines), lines
    assert any(re.search(r"\] stage .*stage=transfer", line) for line in lines), lines
    for key in keys:
        done = [line for line in lines if re.search(rf"\] progress .*task='disk {key}'", line)]
        assert done and "done='3.0 MiB'" in done[-1] and "took=" in done[-1], lines
    assert re.search(
        rf"^replicated {name} \(2 disks\): read 6\.0 MiB in \d+\.\d s \({SIZE}/s\); "
        r"stored 6\.0 MiB$",
        proc.stderr,
        re.M,
    ), proc.stderr

    proc = env.cli("verify", name)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr + proc.stdout and BAR not in proc.stderr
    assert re.search(r"^verified 1 run: read ", proc.stderr, re.M), proc.stderr
