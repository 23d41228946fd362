"""`connector support-bundle`: a tarball of recent logs, the config, state summaries
and version info, with every secret redacted (connector/application/support.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from connector import __version__
from connector.application.support import SupportBundle, summarize_runs, tail
from connector.cli.common import ConfigOpt, out, print_error, run_with_app
from connector.errors import ConnectorError, InvalidInputError
from connector.logging import scrub
from connector.secrets import secret_file_path

if TYPE_CHECKING:
    from connector.app import App

LOG_BYTES = 5 * 1024 * 1024  # per log file: its most recent part
AUDIT_BYTES = 1024 * 1024
JOURNAL_UNIT = "connector.service"


def support_bundle_cmd(
    config: ConfigOpt = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="The tarball to write (default: connector-support-TIME.tar.gz)."
        ),
    ] = None,
    logs: Annotated[
        list[Path] | None,
        typer.Option("--log", help="A log file to include (its last 5 MiB; repeatable)."),
    ] = None,
    since: Annotated[
        float, typer.Option("--since", min=0.1, help="Hours of the service's journal to include.")
    ] = 24.0,
    no_journal: Annotated[
        bool, typer.Option("--no-journal", help=f"Leave out the journal of {JOURNAL_UNIT}.")
    ] = False,
    no_status: Annotated[
        bool, typer.Option("--no-status", help="Leave out `connector status` (probes vCenter, S3).")
    ] = False,
) -> None:
    """Write a tarball for whoever helps you: logs, config, state, versions; secrets redacted."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = output or Path(f"connector-support-{stamp}.tar.gz")
    try:
        _refuse_bad_targets(target, logs or [])
    except InvalidInputError as exc:
        print_error(exc)
        raise typer.Exit(2) from None

    def go(a: App) -> list[str]:
        with a.audited("support.bundle", str(target)):
            bundle = gather(a, logs or [], None if no_journal else since, not no_status)
            return bundle.write(target)

    members = run_with_app(config, go)
    out.print(
        f"wrote {escape(str(target))} ({len(members)} files; every secret the connector "
        "knows is redacted: look before you send)",
        highlight=False,
    )


def _refuse_bad_targets(target: Path, logs: list[Path]) -> None:
    """Refuse an output that exists or has no folder, and a --log that is not a file."""
    if target.exists():
        raise InvalidInputError(f"{target} already exists; give another --output")
    if not target.parent.is_dir():
        raise InvalidInputError(
            f"the folder of {target} does not exist; create it or give another --output"
        )
    for log in logs:
        if not log.is_file():
            raise InvalidInputError(f"--log {log} is not a file")


def gather(a: App, logs: list[Path], journal_hours: float | None, status: bool) -> SupportBundle:
    cfg = a.config
    bundle = SupportBundle(version=__version__, config=cfg.model_dump(mode="json", by_alias=True))
    _collect_secrets(a, bundle)
    if journal_hours is not None:
        _journal(bundle, journal_hours)
    for log in logs:
        bundle.logs[log.name] = tail(log, LOG_BYTES)
    if cfg.audit_path.is_file():
        bundle.logs["audit.jsonl"] = tail(cfg.audit_path, AUDIT_BYTES)
    try:
        bundle.state = _state(a)
    except ConnectorError as exc:
        bundle.notes.append(f"state: {scrub(str(exc))}")
    if status:
        try:
            report = a.status.report(dt.timedelta(hours=12))
            bundle.status = {**dataclasses.asdict(report), "healthy": report.healthy}
        except ConnectorError as exc:
            bundle.notes.append(f"status: {scrub(str(exc))}")
    return bundle


def _collect_secrets(a: App, bundle: SupportBundle) -> None:
    """Every secret value the config names, read to be redacted (never written)."""
    cfg = a.config
    readers: list[tuple[str, Any]] = [
        ("vCenter password", cfg.vcenter_password if cfg.vcenter is not None else None),
        ("S3 secret access key", cfg.s3_secret_key),
        ("store key", cfg.store_key_text),
        ("API token", cfg.api_token if cfg.api is not None else None),
    ]
    for what, read in readers:
        if read is None:
            continue
        try:
            secret = read()
        except ConnectorError as exc:
            bundle.notes.append(f"{what}: could not be read to redact it: {scrub(str(exc))}")
            continue
        if secret is not None:
            bundle.secrets.add(secret.reveal())
    if cfg.s3 is not None and cfg.s3.access_key_id:
        bundle.secrets.add(cfg.s3.access_key_id)
    files = [cfg.key_file]
    if cfg.api is not None:
        files.append(cfg.api.key_file)
    for path in files:
        try:
            real = secret_file_path(path)
            if real.is_file():
                text = real.read_text(encoding="utf-8", errors="replace")
                bundle.secrets.add(text.strip())
                bundle.secrets.update(line.strip() for line in text.splitlines() if line.strip())
        except (ConnectorError, OSError) as exc:
            bundle.notes.append(f"{path}: could not be read to redact it: {scrub(str(exc))}")


def _journal(bundle: SupportBundle, hours: float) -> None:
    journalctl = shutil.which("journalctl")
    if journalctl is None:
        bundle.notes.append("journal: journalctl is not installed; pass the logs with --log")
        return
    try:
        proc = subprocess.run(
            [journalctl, "-u", JOURNAL_UNIT, "--since", f"-{int(hours * 3600)}s",
             "-o", "short-iso", "--no-pager", "-q"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        bundle.notes.append(f"journal: {exc}")
        return
    if proc.returncode != 0:
        bundle.notes.append(f"journal: journalctl exited {proc.returncode}: {proc.stderr.strip()}")
    bundle.logs["journal.txt"] = proc.stdout


def _state(a: App) -> dict[str, Any]:
    servers = a.state.servers()
    jobs = a.jobs.all(include_deleted=True)
    return {
        "servers": [
            {"id": s.id, "name": s.name, "vm_uuid": s.vm_uuid, "disks": len(s.disks)}
            for s in servers
        ],
        "runs": summarize_runs(a.state.runs()),
        "jobs": [
            {
                "id": j.id,
                "server_id": j.server_id,
                "state": j.state,
                "paused": j.paused,
                "frequency_hours": j.frequency_hours,
                "retention": j.retention,
                "consecutive_failures": j.consecutive_failures,
                "message": j.message,
                "retention_due": j.retention_due,
                "retention_attempts": j.retention_attempts,
                "retention_error": j.retention_error,
            }
            for j in jobs
        ],
        "retention_settings": a.state.retention_settings(),
    }
