"""The connector's error tree.

Retry decisions come from an error's class: a `TransientError` may succeed if
tried again later, a `PermanentError` will not. Every message says what
happened and, where it can, what the user should do.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""


class TransientError(ConnectorError):
    """May succeed when retried (network blip, server busy, session expired)."""


class PermanentError(ConnectorError):
    """Will fail again the same way until something is changed by a person."""


class ConfigError(PermanentError):
    """The configuration is missing, malformed or contradicts itself."""


class TLSTrustError(PermanentError):
    """A server's certificate is not trusted (unknown CA, wrong thumbprint, wrong host)."""


class AuthenticationError(PermanentError):
    """The server refused the credentials."""


class UnreachableError(TransientError):
    """A server could not be reached at all."""


class NotFoundError(PermanentError):
    """A VM, disk, run or object that was asked for does not exist."""


class UnsupportedSourceError(PermanentError):
    """The source cannot be replicated correctly as it is (pre-existing snapshot, RDM...)."""


class ChangeIdRefused(ConnectorError):
    """The hypervisor refused a stored changeId; the disk must be read in full."""

    def __init__(self, message: str, fault: str) -> None:
        super().__init__(message)
        self.fault = fault


class IntegrityError(PermanentError):
    """Stored data failed authentication or its hash does not match."""


class StoreFormatError(PermanentError):
    """The object store holds a format this version cannot read."""


class InvalidInputError(PermanentError):
    """A request (command-line argument, job field) is malformed or out of range."""
