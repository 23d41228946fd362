"""Secret values that never print themselves."""

from __future__ import annotations

import os
from pathlib import Path

from connector.errors import ConfigError


class Secret:
    """A secret string: `str()` and `repr()` show a placeholder, `reveal()` the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


def read_secret_file(path: Path, what: str) -> Secret:
    """Read a secret from a file (one line; trailing newline stripped).

    A relative name is first looked up in systemd's $CREDENTIALS_DIRECTORY.
    """
    candidates = [path]
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and not path.is_absolute():
        candidates.insert(0, Path(cred_dir) / path)
    for candidate in candidates:
        if candidate.is_file():
            try:
                value = candidate.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"cannot read the {what} file {candidate}: {exc}") from exc
            if not value:
                raise ConfigError(f"the {what} file {candidate} is empty")
            return Secret(value)
    raise ConfigError(f"the {what} file {path} does not exist; create it (mode 0600)")


def secret_file_path(path: Path) -> Path:
    """Where `read_secret_file` finds the secret (for programs that read the file themselves)."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and not path.is_absolute() and (Path(cred_dir) / path).is_file():
        return Path(cred_dir) / path
    return path
