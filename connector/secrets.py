"""Secret values that never print themselves, and where they come from.

A secret comes from one of three places, never from a URL or the command line:
- a file (one line; trailing newline stripped), mode 0600 or tighter advised;
- a systemd credential: `credential:NAME` reads `$CREDENTIALS_DIRECTORY/NAME`
  (the unit says `LoadCredential=NAME:/etc/connector/NAME`), and a relative
  file name is looked up there first;
- an environment variable, named in the config (`password_env = "VCENTER_PASSWORD"`).
"""

from __future__ import annotations

import os
from pathlib import Path

from connector.errors import ConfigError

CREDENTIAL_PREFIX = "credential:"


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


def is_credential(path: Path | str) -> bool:
    return str(path).startswith(CREDENTIAL_PREFIX)


def credential_path(name: str, what: str) -> Path:
    """The file of systemd credential `name` in $CREDENTIALS_DIRECTORY, or ConfigError."""
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"the {what} credential name {name!r} is not a plain file name")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if not cred_dir:
        raise ConfigError(
            f"the {what} is the systemd credential {name!r}, but $CREDENTIALS_DIRECTORY is "
            "not set (systemd sets it only for the service); run the command as the service "
            f"does: `sudo systemd-run --pipe --wait -p User=connector -p LoadCredential="
            f"{name}:/etc/connector/credentials/{name} connector ...`, or name the folder "
            "that holds the credential files: "
            "`connector --credentials-dir /etc/connector/credentials ...`"
        )
    return Path(cred_dir) / name


def resolve_secret_path(path: Path | str, what: str) -> Path:
    """The real file behind a secret reference (`credential:NAME` or a path)."""
    text = str(path)
    if is_credential(text):
        return credential_path(text[len(CREDENTIAL_PREFIX) :], what)
    return Path(text)


def read_secret_file(path: Path | str, what: str) -> Secret:
    """Read a secret from a file or systemd credential (one line; trailing newline stripped).

    `credential:NAME` names a systemd credential; a relative name is first
    looked up in systemd's $CREDENTIALS_DIRECTORY.
    """
    if is_credential(path):
        candidates = [resolve_secret_path(path, what)]
    else:
        candidates = [Path(path)]
        cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
        if cred_dir and not Path(path).is_absolute():
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
    if is_credential(path):
        raise ConfigError(
            f"the {what} credential {candidates[0].name!r} is not in $CREDENTIALS_DIRECTORY "
            f"({candidates[0].parent}); add LoadCredential={candidates[0].name}:/path/to/file "
            "to the unit"
        )
    raise ConfigError(f"the {what} file {path} does not exist; create it (mode 0600)")


def read_secret_env(variable: str, what: str) -> Secret:
    """Read a secret from an environment variable named in the config."""
    value = os.environ.get(variable)
    if value is None:
        raise ConfigError(
            f"the {what} comes from the environment variable {variable}, which is not set"
        )
    value = value.strip("\r\n")
    if not value:
        raise ConfigError(f"the environment variable {variable} (the {what}) is empty")
    return Secret(value)


def load_secret(file: Path | str | None, env: str | None, what: str) -> Secret:
    """The secret from a file/credential or an environment variable (exactly one is set)."""
    if file is not None:
        return read_secret_file(file, what)
    if env is not None:
        return read_secret_env(env, what)
    raise ConfigError(f"no source is configured for the {what}")


def secret_file_path(path: Path | str) -> Path:
    """Where `read_secret_file` finds the secret (for programs that read the file themselves)."""
    if is_credential(path):
        return resolve_secret_path(path, "secret")
    path = Path(path)
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and not path.is_absolute() and (Path(cred_dir) / path).is_file():
        return Path(cred_dir) / path
    return path
