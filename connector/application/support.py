"""A support bundle: what someone helping the operator needs, with every secret redacted.

`SupportBundle.write` gathers, into one gzip'd tarball (mode 0600):
- `version.json`: the connector's version, Python, the platform, library versions;
- `config.json`: the config as loaded (comments dropped), each secret-named value
  redacted (`access_key_id`, keys naming a password, secret or token, except the
  references to where a secret is: `*_file`, `*_env`);
- `environment.json`: the connector's variables, by name; values only for a few
  harmless ones (CONNECTOR_CONFIG, the proxy settings, AWS_REGION...);
- `logs/*`: the recent log lines (the journal of the service, or the log files
  given), and the tail of the audit log;
- `state.json`: summaries of the state database (servers, runs by state, jobs,
  owed retentions), no secret and no data;
- `status.json` when given: the report of `connector status`.

Redaction is applied to every member's text: each secret the config names (read
from its file, credential or variable), the store key, and anything the log
scrubber recognises (signed URLs, passwords in URLs), plus `password=...`-style
assignments of any value. A secret that is unknown to the connector and appears
in no such form cannot be recognised: the bundle says so in its README.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from connector.domain.records import RunRow
from connector.logging import is_secret_key, scrub

REDACTED = "**********"
LIBRARIES = ("boto3", "botocore", "pyvmomi", "cryptography", "SQLAlchemy", "pydantic", "typer")
SHOWN_VARIABLES = (
    "CONNECTOR_CONFIG",
    "CREDENTIALS_DIRECTORY",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
    "INVOCATION_ID",
)
# `password = "..."`, `token: ...`, `secret=...` in free text (a log line, a note)
_ASSIGNED = re.compile(
    r"(?i)\b([\w.-]*(?:password|passwd|secret|token|authorization)[\w.-]*)"
    r"(\"?\s*[:=]\s*\"?)([^\s\"',;&]+)"
)
# config keys that name where a secret is, not the secret
_REFERENCE_SUFFIXES = ("_file", "_env")
README = """\
A support bundle of the replication connector.

Every secret the configuration names (vCenter password, AWS secret key, store
key, API token) was read from its file, credential or variable and replaced by
{redacted} wherever it appeared, as were signed-URL credentials, passwords in
URLs and `password=...`-style values. Secrets the connector does not know of
(typed into a log by hand, say) cannot be recognised: look before you send.
"""


@dataclass
class SupportBundle:
    """What goes into a bundle; `write` redacts it and writes the tarball."""

    version: str
    config: Mapping[str, Any]  # the config as loaded (Config.model_dump)
    secrets: set[str] = field(default_factory=set)  # every secret value to redact
    logs: dict[str, str] = field(default_factory=dict)  # member name -> text
    state: Mapping[str, Any] = field(default_factory=dict)
    status: Mapping[str, Any] | None = None
    environment: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    notes: list[str] = field(default_factory=list)  # what could not be gathered, and why

    def members(self) -> dict[str, str]:
        """Every member's name and its redacted text."""
        members = {
            "README.txt": README.format(redacted=REDACTED),
            "version.json": _json(self._versions()),
            "config.json": _json(redact_config(self.config)),
            "environment.json": _json(redact_environment(self.environment)),
            "state.json": _json(self.state),
        }
        if self.status is not None:
            members["status.json"] = _json(self.status)
        for name, text in self.logs.items():
            members[f"logs/{name}"] = text
        if self.notes:
            members["NOTES.txt"] = "\n".join(self.notes) + "\n"
        return {
            name: self.redact(text, free_text=not name.endswith(".json"))
            for name, text in members.items()
        }

    def redact(self, text: str, free_text: bool = True) -> str:
        """Every known secret out of `text`; in free text (logs, notes) also the values
        of `password=...`-style assignments (the JSON members are redacted by key)."""
        for value in sorted((s for s in self.secrets if len(s) >= 4), key=len, reverse=True):
            text = text.replace(value, REDACTED)
        if free_text:
            text = _ASSIGNED.sub(_redact_assignment, text)
        return scrub(text)

    def write(self, target: Path) -> list[str]:
        """Write the tarball (gzip, mode 0600) and return its member names."""
        members = self.members()
        root = target.name.removesuffix(".tar.gz").removesuffix(".tgz") or "support"
        tmp = target.with_name(f".{target.name}.partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                now = time.time()
                for name, text in members.items():
                    data = text.encode("utf-8")
                    info = tarfile.TarInfo(f"{root}/{name}")
                    info.size, info.mtime, info.mode = len(data), now, 0o600
                    tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return [f"{root}/{name}" for name in members]

    def _versions(self) -> dict[str, Any]:
        libraries: dict[str, str | None] = {}
        for name in LIBRARIES:
            try:
                libraries[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                libraries[name] = None
        return {
            "connector": self.version,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "libraries": libraries,
        }


def _redact_assignment(m: re.Match[str]) -> str:
    if m.group(1).lower().endswith(_REFERENCE_SUFFIXES):
        return m.group(0)  # password_file=/etc/...: where the secret is, not the secret
    return f"{m.group(1)}{m.group(2)}{REDACTED}"


def redact_config(value: Any, key: str = "") -> Any:
    """The config with every secret-named value replaced (references to secrets kept)."""
    if isinstance(value, Mapping):
        return {str(k): redact_config(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(v, key) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    if key.endswith(_REFERENCE_SUFFIXES):
        return text
    if key == "access_key_id" or is_secret_key(key):
        return REDACTED
    return text


def redact_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The connector's variables (CONNECTOR_*, AWS_*, proxies...), most by name only."""
    shown: dict[str, str] = {}
    for name in sorted(env):
        relevant = name.startswith(("CONNECTOR_", "AWS_")) or name in SHOWN_VARIABLES
        if not relevant:
            continue
        shown[name] = env[name] if name in SHOWN_VARIABLES else "(set)"
    return shown


def tail(path: Path, max_bytes: int) -> str:
    """The last `max_bytes` of a text file, from a line's start."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - max_bytes))
        data = f.read()
    if size > max_bytes:
        data = data.partition(b"\n")[2]
    return data.decode("utf-8", errors="replace")


def summarize_runs(runs: Iterable[RunRow]) -> dict[str, Any]:
    """Runs by state, and the most recent ones (id, server, state, times, error)."""
    rows = sorted(runs, key=lambda r: (r.started_at, r.id), reverse=True)
    by_state: dict[str, int] = {}
    for r in rows:
        by_state[r.state] = by_state.get(r.state, 0) + 1
    recent = [
        {
            "id": r.id,
            "server_id": r.server_id,
            "state": r.state,
            "started_at": r.started_at,
            "finished_at": r.finished_at,
            "error": r.error,
        }
        for r in rows[:50]
    ]
    return {"count": len(rows), "by_state": by_state, "recent": recent}


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str) + "\n"
