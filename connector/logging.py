"""Structured logging with structlog, with a redaction processor for secrets."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from connector.secrets import Secret

_REDACTED = "**********"
_SECRET_KEYS = ("password", "secret", "token", "key_material", "authorization", "cookie")
_known_secrets: set[str] = set()


def register_secret(secret: Secret) -> None:
    """Make the redaction processor scrub this value wherever it appears."""
    value = secret.reveal()
    if len(value) >= 4:
        _known_secrets.add(value)


def scrub(text: str) -> str:
    for value in _known_secrets:
        if value in text:
            text = text.replace(value, _REDACTED)
    return text


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for k, v in list(event.items()):
        if (any(s in k.lower() for s in _SECRET_KEYS) and not isinstance(v, bool)) or isinstance(
            v, Secret
        ):
            event[k] = _REDACTED
        elif isinstance(v, str):
            event[k] = scrub(v)
        elif isinstance(v, BaseException):
            event[k] = scrub(f"{type(v).__name__}: {v}")
    return event


def configure(level: str = "info", json: bool = False) -> None:
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
