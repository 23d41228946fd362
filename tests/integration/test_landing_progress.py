"""`connector land` on a terminal: a bar per disk with bytes, rate and ETA, then a
summary line with what was sent, the duration and the throughput."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from tests.harness.fixtures_landing import LandingMoto
from tests.harness.landing_env import MiB, make_env
from tests.harness.terminal import run_in_terminal
from tests.integration.test_landing_e2e import ok_json

pytestmark = pytest.mark.integration

BAR = "━"
SIZE = r"\d+(?:\.\d)? (?:B|KiB|MiB|GiB)"
FINISHED = re.compile(rf"^disk (\d+) {BAR}+ {SIZE}/{SIZE} +{SIZE}/s +done in \d+\.\d s")


def test_land_on_a_terminal_shows_bytes_rate_per_disk_and_a_summary(
    tmp_path: Path, landing_moto: LandingMoto
) -> None:
    env = make_env(tmp_path, landing_moto, landing={"mode": "on-demand"})
    env.write(0, 0, os.urandom(2 * MiB))
    env.write(1, 0, os.urandom(MiB))
    ok_json(env, "replicate", "web-1")
    environ = {**os.environ, "CONNECTOR_CONFIG": str(env.config)}
    run = run_in_terminal([sys.executable, "-m", "connector", "land", "web-1"], environ)
    assert run.returncode == 0, run.text()
    final = run.final()
    finished = {int(m[1]) for line in final if (m := FINISHED.match(line))}
    assert len(finished) == 2, "\n".join(final)
    summary = [line for line in final if line.startswith("landed web-1 (")]
    assert len(summary) == 1, final
    assert re.fullmatch(
        rf"landed web-1 \(2 disks\): sent {SIZE} in \d+\.\d s \({SIZE}/s\)", summary[0]
    ), summary
    assert any(line.startswith("run r-") and "landed: AMI ami-" in line for line in final)
