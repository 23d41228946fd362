"""The append-only audit log: who or what did which action on which object, when,
with what outcome.

One JSON record per line. Each record carries a sequence number, the SHA-256 of
the previous record (`prev`) and its own SHA-256 (`hash`), both over the
canonical JSON of a record without its `hash` field (sorted keys, no spaces,
UTF-8). Changing a line breaks its own hash; removing one breaks the sequence
and the chain at the next line. A small head file beside the log
(`<log>.head`) holds the sequence number and hash of the last record, so cutting
records off the end is detected too; every append is also logged (event
`audit.recorded` with seq and hash), which leaves an independent witness in the
journal.

Appends take an exclusive lock on the log, open it with O_APPEND, write one
line in one call and fsync it. The file is created with mode 0600.

Records never hold secrets: details pass through the same redaction as the logs.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.errors import ConfigError, IntegrityError, PermanentError
from connector.logging import get_logger, is_secret_key, scrub
from connector.secrets import Secret

log = get_logger(__name__)

GENESIS = "0" * 64
_REDACTED = "**********"
SUCCESS = "success"
FAILURE = "failure"
STARTED = "started"
DENIED = "denied"


def canonical(record: Mapping[str, Any]) -> bytes:
    """The canonical JSON encoding that hashes are computed over."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a record without its own `hash` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def default_actor() -> str:
    """The person or account running this process (the sudo caller when there is one)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.geteuid()}"
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != user:
        return f"{sudo_user} (sudo as {user})"
    return user


def sanitize(value: Any, key: str = "") -> Any:
    """A JSON-safe copy of `value` with secrets removed (same rules as the logs)."""
    if isinstance(value, Secret) or (key and is_secret_key(key) and not isinstance(value, bool)):
        return _REDACTED
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Path):
        return scrub(str(value))
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    if isinstance(value, Mapping):
        return {str(k): sanitize(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [sanitize(v) for v in value]
    return scrub(str(value))


@dataclass
class AuditLog:
    """Appends hash-chained records to one file."""

    path: Path
    actor: str = field(default_factory=default_actor)

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def record(
        self,
        action: str,
        object: str,
        outcome: str,
        *,
        actor: str | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        """Append one record and return it. Raise PermanentError when the log cannot be
        written or its last record is damaged (an action is not done unaudited)."""
        if not action or not object or not outcome:
            raise ValueError("an audit record needs an action, an object and an outcome")
        with self._locked() as fd:
            last = _read_last_record(fd, self.path)
            seq = int(last["seq"]) + 1 if last is not None else 1
            prev = str(last["hash"]) if last is not None else GENESIS
            entry: dict[str, Any] = {
                "seq": seq,
                "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
                "actor": sanitize(actor or self.actor),
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "action": sanitize(action),
                "object": sanitize(object),
                "outcome": sanitize(outcome),
                "details": sanitize(details),
                "prev": prev,
            }
            entry["hash"] = record_hash(entry)
            line = canonical(entry) + b"\n"
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                os.fsync(fd)
                self._write_head(seq, entry["hash"])
            except OSError as exc:
                raise PermanentError(f"cannot append to the audit log {self.path}: {exc}") from exc
        log.info("audit.recorded", seq=seq, hash=entry["hash"], action=action, outcome=outcome)
        return entry

    @contextmanager
    def _locked(self) -> Iterator[int]:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PermanentError(
                f"cannot open the audit log {self.path}: {exc}; check [audit] path and the "
                "permissions of its folder"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # also releases the lock

    def _write_head(self, seq: int, digest: str) -> None:
        tmp = self.head_path.with_name(self.head_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps({"seq": seq, "hash": digest}).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.head_path)


def _read_last_record(fd: int, path: Path) -> dict[str, Any] | None:
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    chunk = 4096
    data = b""
    position = size
    while position > 0:
        step = min(chunk, position)
        position -= step
        data = os.pread(fd, step, position) + data
        # the last complete line is the text after the second-to-last newline
        if data.count(b"\n") >= 2 or position == 0:
            break
        chunk *= 2
    if not data.endswith(b"\n"):
        raise PermanentError(
            f"the audit log {path} ends with an incomplete line; run `connector audit verify` "
            "and move the damaged log aside before continuing"
        )
    last = data[:-1].rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
        if not isinstance(record, dict) or "seq" not in record or "hash" not in record:
            raise ValueError("not an audit record")
    except ValueError:
        raise PermanentError(
            f"the last line of the audit log {path} is not an audit record; run "
            "`connector audit verify` and move the damaged log aside before continuing"
        ) from None
    return record


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    path: Path
    records: int = 0
    problems: list[str] = field(default_factory=list)
    first_bad_line: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, line: int, message: str) -> None:
        if self.first_bad_line is None:
            self.first_bad_line = line
        self.problems.append(message)


def verify(path: Path) -> VerifyResult:
    """Check the whole chain; the first problem names the line where it breaks."""
    result = VerifyResult(path)
    if not path.is_file():
        raise ConfigError(f"the audit log {path} does not exist")
    prev_hash = GENESIS
    prev_seq = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                result.fail(number, f"line {number} is incomplete (no line end)")
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
                seq, stored, prev = int(record["seq"]), str(record["hash"]), str(record["prev"])
            except (ValueError, KeyError, TypeError):
                result.fail(number, f"line {number} is not an audit record (damaged or edited)")
                prev_hash, prev_seq = "", prev_seq + 1
                continue
            result.records += 1
            if record_hash(record) != stored:
                result.fail(
                    number,
                    f"line {number} (record {seq}) was changed: its content does not match "
                    "its hash",
                )
            if seq != prev_seq + 1:
                if seq > prev_seq + 1:
                    missing = seq - prev_seq - 1
                    result.fail(
                        number,
                        f"line {number} holds record {seq} but record {prev_seq + 1} was "
                        f"expected: {missing} record(s) were removed before line {number}",
                    )
                else:
                    result.fail(
                        number,
                        f"line {number} holds record {seq} after record {prev_seq}: records "
                        "were duplicated or reordered",
                    )
            elif prev != prev_hash and prev_hash:
                result.fail(
                    number - 1,
                    f"line {number} (record {seq}) does not chain to line {number - 1}: "
                    f"line {number - 1} was changed",
                )
            prev_hash, prev_seq = stored, seq
    head = path.with_name(path.name + ".head")
    if head.is_file():
        try:
            expected = json.loads(head.read_text())
            head_seq, head_hash = int(expected["seq"]), str(expected["hash"])
        except (ValueError, KeyError, TypeError):
            result.fail(result.records + 1, f"the head file {head} is damaged")
        else:
            if prev_seq < head_seq:
                result.fail(
                    result.records + 1,
                    f"the log ends with record {prev_seq} but record {head_seq} was written: "
                    f"{head_seq - prev_seq} record(s) were removed from the end",
                )
            elif prev_seq == head_seq and prev_hash != head_hash:
                result.fail(
                    result.records,
                    f"the last record ({prev_seq}) is not the one that was written last",
                )
    return result


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of a log (for display); IntegrityError on a line that is not JSON."""
    records: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                records.append(json.loads(raw))
            except ValueError:
                raise IntegrityError(f"line {number} of {path} is not JSON") from None
    return records
