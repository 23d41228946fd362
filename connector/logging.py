"""Structured logging with structlog, with a redaction processor for secrets.

The connector's own events (structlog) and the standard-library loggers of the
libraries it uses (botocore, urllib3, pyVmomi...) go through the same
processor chain, whose last step before rendering is `redact`: values under
secret-sounding keys, `Secret` objects, and the text of every registered
secret (vCenter password, AWS secret key, store key, API token) are replaced
by a placeholder wherever they appear, exception tracebacks included.

Every line goes to the standard error of the moment, through `STDERR`: while a
live progress display owns the terminal (`routed_through`), each line is printed
through that display's rich console instead, which puts it above the bars
rather than into the middle of one.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Protocol, TextIO, cast

import structlog

from connector.secrets import Secret

_REDACTED = "**********"
_SECRET_KEYS = ("password", "secret", "token", "key_material", "authorization", "cookie")
_known_secrets: set[str] = set()

# Credentials that travel inside URLs and request headers: query parameters of
# presigned AWS URLs (SigV4 and SigV2), SigV4 Authorization values, and the
# user:password part of a URL.
_SIGNED_QUERY = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId"
    r"|Credential)=[^&\s\"',;]+"
)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]*:[^/\s@]*@")

# Library loggers whose level follows [log] library_level rather than [log] level.
LIBRARY_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "pyVmomi",
    "pyVim",
    "sqlalchemy",
    "apscheduler",
    "huey",
    "uvicorn",
    "alembic",
)


class LineConsole(Protocol):
    """What a live display offers to print a line above itself (a rich Console)."""

    def print(self, *objects: Any, **kwargs: Any) -> None: ...


class _Stderr(io.TextIOBase):
    """A file-like standard error: whole lines, to a live display's console when one is
    routed, else to `sys.stderr` as it is at the time of the write (pytest swaps it)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._console: LineConsole | None = None
        self._partial = threading.local()

    def write(self, text: str) -> int:
        console = self._console
        if console is None:
            return sys.stderr.write(text)
        pending = getattr(self._partial, "text", "") + text
        *lines, rest = pending.split("\n")
        self._partial.text = rest
        for line in lines:
            with self._lock:
                # markup=False: a log line is text; a `[retention]` in it stays as it is.
                console.print(line, markup=False, highlight=False, soft_wrap=True, emoji=False)
        return len(text)

    def flush(self) -> None:
        if self._console is None:
            sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    @contextmanager
    def routed_through(self, console: LineConsole) -> Iterator[None]:
        """Print every log line through `console` until the block ends."""
        previous = self._console
        self._console = console
        try:
            yield
        finally:
            rest = getattr(self._partial, "text", "")
            self._partial.text = ""
            self._console = previous
            if rest:
                self.write(rest + "\n")


STDERR = _Stderr()


def routed_through(console: LineConsole) -> Any:
    """While the block runs, log lines go through `console` (a live display's)."""
    return STDERR.routed_through(console)


def register_secret(secret: Secret) -> None:
    """Make the redaction processor scrub this value wherever it appears."""
    value = secret.reveal()
    if len(value) >= 4:
        _known_secrets.add(value)
        stripped = value.strip()
        if stripped != value and len(stripped) >= 4:
            _known_secrets.add(stripped)


def is_secret_key(key: str) -> bool:
    """Whether a field name says its value is a secret (password, token...)."""
    lowered = key.lower()
    return any(s in lowered for s in _SECRET_KEYS)


def scrub(text: str) -> str:
    """`text` without secrets: every registered secret, the signatures and credentials
    of signed URLs and Authorization headers, and passwords in URLs.

    The one scrubber: logs, error messages, audit records and the S3 and KMS
    adapters' errors all go through it.
    """
    for value in sorted(_known_secrets, key=len, reverse=True):
        if value in text:
            text = text.replace(value, _REDACTED)
    if "=" in text:
        text = _SIGNED_QUERY.sub(lambda m: f"{m.group(1)}={_REDACTED}", text)
    if "@" in text:
        text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{_REDACTED}@", text)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, Secret):
        return _REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    if isinstance(value, bytes | bytearray):
        return scrub(repr(bytes(value)))
    if isinstance(value, dict):
        return {
            k: _REDACTED if is_secret_key(str(k)) else _scrub_value(v) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrub_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(str(value))


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in list(event.items()):
        if k.startswith("_"):  # structlog's bookkeeping (the stdlib record, renderer hints)
            continue
        if (is_secret_key(k) and not isinstance(v, bool)) or isinstance(v, Secret):
            event[k] = _REDACTED
        else:
            event[k] = _scrub_value(v)
    return event


class _LoggerName:
    """Adds the name of a standard-library logger to its event."""

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        record = event.get("_record")
        if isinstance(record, logging.LogRecord) and "logger" not in event:
            event["logger"] = record.name
        return event


def configure(level: str = "info", json: bool = False, library_level: str = "warning") -> None:
    """Set up structlog and route the standard-library loggers through the same chain."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_plain_traceback)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_level(level)),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, STDERR)),
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _LoggerName()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(STDERR)
    handler.setFormatter(formatter)
    handler.set_name("connector")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "connector"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_level(level))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(_level(library_level))


def _plain_traceback(sio: Any, exc_info: Any) -> None:
    import traceback

    sio.write("\n" + "".join(traceback.format_exception(*exc_info)))


def _level(name: str) -> int:
    return logging.getLevelNamesMapping().get(name.upper(), logging.INFO)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(
        cast(TextIO, STDERR)
    )  # the stream of the moment, not of import time


def _default() -> None:
    """Until `configure` runs (a library use, a test script): warnings and errors to
    stderr, redacted, as the standard library does for its loggers; never stdout."""
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.format_exc_info,
            redact,
            structlog.dev.ConsoleRenderer(colors=False, exception_formatter=_plain_traceback),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


_default()
