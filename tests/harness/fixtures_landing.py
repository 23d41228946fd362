"""pytest fixtures: moto_server with the landing extension, its call log and its faults.

One extended moto_server serves the session (EBS direct APIs, EC2, KMS, STS, S3);
`landing_moto` hands each test the server with an emptied call log and no faults.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness.ca import TestCA
from tests.harness.moto import MotoServer, start_moto

# The variables tests/harness/motoext.py reads (not imported: that would load moto here).
CALL_LOG_VAR = "MOTOEXT_CALL_LOG"
FAULTS_VAR = "MOTOEXT_FAULTS"


@dataclass(frozen=True)
class LandingMoto:
    """The extended moto_server and the two files it shares with the test."""

    server: MotoServer
    call_log: Path
    faults: Path

    def calls(self, op: str | None = None) -> list[dict[str, Any]]:
        """The landing calls the server answered since the test began (of one operation)."""
        if not self.call_log.exists():
            return []
        out = [json.loads(line) for line in self.call_log.read_text().splitlines() if line]
        return [c for c in out if op is None or c["op"] == op]

    def blocks_sent(self, snapshot_id: str) -> set[int]:
        """The block indexes PutSnapshotBlock wrote into one snapshot."""
        return {
            c["index"]
            for c in self.calls("PutSnapshotBlock")
            if c["snapshot"] == snapshot_id and "fault" not in c
        }

    def inject(self, op: str, code: str, count: int = 1, status: int = 400, **extra: Any) -> None:
        """The next `count` calls of `op` fail with `code`."""
        doc = json.loads(self.faults.read_text() or "{}") if self.faults.exists() else {}
        doc.setdefault(op, []).append({"code": code, "status": status, "count": count, **extra})
        self.faults.write_text(json.dumps(doc))

    def pending_faults(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.faults.read_text() or "{}")
        return {k: v for k, v in doc.items() if v}

    def reset(self) -> None:
        self.call_log.write_text("")
        self.faults.write_text("{}")


@pytest.fixture(scope="session")
def landing_moto_server(
    test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LandingMoto]:
    workdir: Path = tmp_path_factory.mktemp("moto-landing")
    call_log, faults = workdir / "calls.jsonl", workdir / "faults.json"
    call_log.write_text("")
    faults.write_text("{}")
    handle = start_moto(
        test_ca,
        workdir,
        name="moto-landing",
        extended=True,
        extra_env={CALL_LOG_VAR: str(call_log), FAULTS_VAR: str(faults)},
    )
    try:
        yield LandingMoto(handle.server, call_log, faults)
    finally:
        handle.stop()


@pytest.fixture
def landing_moto(landing_moto_server: LandingMoto) -> Iterator[LandingMoto]:
    landing_moto_server.reset()
    yield landing_moto_server
    landing_moto_server.reset()
