"""An ObjectStore on a local directory (tests, air-gapped staging, restore drills).

Writes are atomic: the data goes to a temporary file in the target directory,
is fsynced, renamed over the final name, and the directory is fsynced, so a
reader sees either the whole object or nothing, even after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISREG

from connector.domain.objectkeys import check_range, validate_key
from connector.errors import ConfigError, NotFoundError, PermanentError, TransientError

_TMP_MARK = ".tmp-"

__all__ = ["LocalDirObjectStore", "validate_key"]


class LocalDirObjectStore:
    """Objects are files under `root`; the key is the relative path."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the object store directory {root}: {exc}") from exc
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        return self._root

    def _path(self, key: str) -> Path:
        path = self._root.joinpath(*validate_key(key).split("/"))
        # Defence in depth against symlinked directories pointing outside the root.
        parent = path.parent.resolve()
        if parent != self._root and self._root not in parent.parents:
            raise ValueError(f"object key {key!r} resolves outside the store root")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP_MARK}{path.name}-{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise _map_os_error(exc, f"writing {key}") from exc

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        path = self._path(key)
        try:
            with path.open("rb") as f:
                if offset:
                    f.seek(offset)
                return f.read() if length is None else f.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFoundError(f"object {key} does not exist in {self._root}") from exc
        except OSError as exc:
            raise _map_os_error(exc, f"reading {key}") from exc

    def stat(self, key: str) -> int | None:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise _map_os_error(exc, f"reading the size of {key}") from exc
        if not S_ISREG(st.st_mode):
            return None
        return st.st_size

    def list(self, prefix: str) -> Iterator[str]:
        if prefix.startswith("/") or "\\" in prefix:
            raise ValueError(f"list prefix {prefix!r} must be relative and use '/'")
        # Walk only the deepest directory that can hold matching keys.
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if head:
            validate_key(head)
        start = self._root.joinpath(*head.split("/")) if head else self._root
        if not start.is_dir():
            return iter(())
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self._root).as_posix()
            base = "" if rel_dir == "." else rel_dir + "/"
            for name in filenames:
                if name.startswith("."):
                    continue  # temporary files of writes in progress
                key = base + name
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return iter(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        except OSError as exc:
            raise _map_os_error(exc, f"deleting {key}") from exc
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _map_os_error(exc: OSError, doing: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return TransientError(f"{doing}: the disk is full ({exc.strerror}); free space")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentError(f"{doing}: permission denied ({exc}); check the directory's owner")
    return PermanentError(f"{doing}: {exc}")
