"""The audit log: hash chain, tamper detection, file mode, concurrent writers, CLI."""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from connector.audit import GENESIS, AuditLog, record_hash, verify
from connector.errors import PermanentError
from connector.logging import register_secret
from connector.secrets import Secret


def filled(tmp_path: Path, n: int = 6) -> AuditLog:
    audit = AuditLog(tmp_path / "audit" / "audit.jsonl", actor="ops@example")
    for i in range(n):
        audit.record("run.start", f"vm {i}", "started", run=f"r-{i}")
    return audit


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args], capture_output=True, text=True, check=False
    )


def test_records_chain_and_verify(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    records = [json.loads(line) for line in lines(audit.path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(records):
        assert after["prev"] == before["hash"] == record_hash(before)
    first = records[0]
    assert first["actor"] == "ops@example" and first["action"] == "run.start"
    assert first["object"] == "vm 0" and first["outcome"] == "started"
    assert first["details"] == {"run": "r-0"} and first["time"].endswith("+00:00")
    result = verify(audit.path)
    assert result.ok and result.records == 6


def test_file_is_private_and_append_only(tmp_path: Path) -> None:
    audit = filled(tmp_path, 1)
    assert stat.S_IMODE(audit.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(audit.path.parent.stat().st_mode) == 0o700
    size = audit.path.stat().st_size
    audit.record("restore", "vm 1", "success")
    assert audit.path.read_bytes()[:size] == lines(audit.path)[0].encode()


def test_an_edited_line_is_detected_and_named(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    text = lines(audit.path)
    text[2] = text[2].replace('"vm 2"', '"vm 9"')
    audit.path.write_text("".join(text))
    result = verify(audit.path)
    assert not result.ok and result.first_bad_line == 3
    assert "line 3 (record 3) was changed" in result.problems[0]


def test_an_edited_line_with_a_recomputed_hash_is_detected_at_its_successor(
    tmp_path: Path,
) -> None:
    audit = filled(tmp_path)
    text = lines(audit.path)
    record = json.loads(text[1])
    record["outcome"] = "success"
    record["hash"] = record_hash(record)
    text[1] = json.dumps(record) + "\n"
    audit.path.write_text("".join(text))
    result = verify(audit.path)
    assert result.first_bad_line == 2
    assert "line 3 (record 3) does not chain to line 2: line 2 was changed" in result.problems


def test_a_removed_line_is_detected_and_named(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    text = lines(audit.path)
    del text[3]
    audit.path.write_text("".join(text))
    result = verify(audit.path)
    assert result.first_bad_line == 4
    assert "line 4 holds record 5 but record 4 was expected" in result.problems[0]


@pytest.mark.parametrize("cut", ["last", "first"])
def test_removed_first_or_last_lines_are_detected(tmp_path: Path, cut: str) -> None:
    audit = filled(tmp_path)
    text = lines(audit.path)
    audit.path.write_text("".join(text[:-1] if cut == "last" else text[1:]))
    result = verify(audit.path)
    assert not result.ok
    if cut == "last":
        assert "removed from the end" in result.problems[0]
    else:
        assert result.first_bad_line == 1 and "record 1 was expected" in result.problems[0]


def test_details_never_hold_secrets(tmp_path: Path) -> None:
    secret = "audit-secret-" + os.urandom(6).hex()
    register_secret(Secret(secret))
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.record(
        "config.load",
        "/etc/connector/connector.toml",
        "failure",
        error=f"vCenter said {secret}",
        password="pw-in-clear-text",
        token=Secret("token-value-xyz"),
        nested={"api_token": "zzz", "note": secret},
    )
    text = audit.path.read_text()
    assert secret not in text and "pw-in-clear-text" not in text and "token-value-xyz" not in text
    assert '"api_token":"**********"' in text


def test_a_damaged_last_line_stops_further_actions(tmp_path: Path) -> None:
    audit = filled(tmp_path, 2)
    with audit.path.open("a") as f:
        f.write('{"seq": 3, "half a rec')
    with pytest.raises(PermanentError, match="incomplete line"):
        audit.record("run.start", "vm x", "started")


def _append_many(path: str, worker: int) -> None:
    log = AuditLog(Path(path), actor=f"worker-{worker}")
    for i in range(25):
        log.record("job.change", f"job {worker}-{i}", "success")


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    with ProcessPoolExecutor(max_workers=4) as pool:
        list(pool.map(_append_many, [str(path)] * 4, range(4)))
    result = verify(path)
    assert result.ok, result.problems
    assert result.records == 100


def test_audit_verify_command_names_the_broken_line(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    ok = cli("audit", "verify", "--file", str(audit.path))
    assert ok.returncode == 0 and "6 records, chain intact" in ok.stdout
    text = lines(audit.path)
    text[4] = text[4].replace("started", "success")
    audit.path.write_text("".join(text))
    broken = cli("audit", "verify", "--file", str(audit.path))
    assert broken.returncode == 1
    assert "line 5 (record 5) was changed" in broken.stderr
    assert "breaks at line 5" in broken.stderr
    missing = cli("audit", "verify", "--file", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
