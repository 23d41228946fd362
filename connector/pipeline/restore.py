"""Restore: a raw image of one disk at one committed run, checked block by block."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connector.domain.extents import block_count
from connector.domain.ids import check_disk_key, check_run_id
from connector.domain.manifest import BlockRef, leaves
from connector.domain.merkle import merkle_root
from connector.errors import IntegrityError, InvalidInputError, NotFoundError, PermanentError
from connector.store.repository import Repository, pack_key

# Contiguous blobs of one pack are fetched in one ranged GET up to this size.
MAX_FETCH = 16 * 1024 * 1024


@dataclass(frozen=True)
class RestoreResult:
    path: Path
    size: int
    sha256: str
    blocks: int


class RestoreWriteError(PermanentError):
    """Writing the image failed midway (no space, an I/O error); no partial file is left."""


def restore_disk(
    repo: Repository,
    server_id: str,
    run_id: str,
    disk_key: int,
    target: Path,
    progress: Callable[[int, int], None] | None = None,
    device: bool = False,
) -> RestoreResult:
    """Write the disk's image at `run_id` to `target` and return its SHA-256.

    `progress(done, total)` is called after each group of blocks with the bytes of
    stored blocks written so far and in all (the all-zero blocks are not counted).

    Without `device`, the target is a regular file: the image is written to a
    temporary file beside it and renamed into place only when every block has
    authenticated (an existing file is replaced whole, or not at all). With
    `device`, the target must be a block device, written in place: every block
    of the disk, zeros included, and the node itself is never replaced.
    Anything else (a character device, a FIFO, a socket, a folder, a path
    under /proc or /sys, a missing folder) is refused with InvalidInputError
    before a byte is written, and so is a file that cannot be made or cannot
    grow to the disk's size (read-only, EFBIG, no room for the stored blocks)
    or a device smaller than the disk; a write that fails midway raises
    RestoreWriteError and leaves no temporary file.
    """
    check_target(target, device)
    check_run_id(run_id)
    check_disk_key(disk_key)
    commit = repo.read_commit(server_id, run_id)
    if not any(d["disk_key"] == disk_key for d in commit["disks"]):
        keys = ", ".join(str(d["disk_key"]) for d in commit["disks"])
        raise NotFoundError(f"run {run_id} has no disk {disk_key} (its disks: {keys})")
    manifest = repo.read_manifest(server_id, run_id, disk_key)
    full = repo.resolve_map(manifest)
    nblocks = block_count(manifest.capacity, manifest.block_size)
    last_len = manifest.capacity - (nblocks - 1) * manifest.block_size if nblocks else 0
    root = merkle_root(
        leaves(full, nblocks, repo.zero_id(manifest.block_size), repo.zero_id(last_len))
    )
    if root != manifest.merkle_root:
        raise IntegrityError(
            f"the block map of run {run_id} disk {disk_key} does not match its Merkle root"
        )
    refs = sorted(((i, r) for i, r in full.items() if r is not None), key=lambda x: x[0])
    stored = sum(last_len if index == nblocks - 1 else manifest.block_size for index, _ in refs)
    if device:
        fd = _open_device(target, manifest.capacity)
        out_path = target
    else:
        out_path, fd = _create_partial(target, manifest.capacity, stored)
    ok = False
    written = 0
    written_bytes = 0

    def failed(exc: OSError) -> RestoreWriteError:
        return RestoreWriteError(_write_failure(target, device, exc, written, len(refs)))

    try:
        try:
            if device:
                _zero_unstored(fd, full, nblocks, manifest.block_size, manifest.capacity)
            for group in _fetch_groups(refs):
                first = group[0][1]
                last = group[-1][1]
                span = last.offset + last.length - first.offset
                data = repo.objects.get(pack_key(first.pack_id), first.offset, span)
                for index, ref in group:
                    blob = data[ref.offset - first.offset : ref.offset - first.offset + ref.length]
                    what = (
                        f"block {index} of run {run_id} disk {disk_key} (pack {ref.pack_id[:16]})"
                    )
                    plain = repo.open_block(ref, blob, what)
                    _write_all(fd, plain, index * manifest.block_size)
                    written_bytes += len(plain)
                written += len(group)
                if progress is not None:
                    progress(written_bytes, stored)
            os.fsync(fd)
        except OSError as exc:
            raise failed(exc) from None
        finally:
            os.close(fd)
        if not device:
            try:
                os.replace(out_path, target)
            except OSError as exc:
                raise failed(exc) from None
        ok = True
    finally:
        if not ok and not device:
            out_path.unlink(missing_ok=True)
    return RestoreResult(
        target, manifest.capacity, sha256_file(target, manifest.capacity), len(refs)
    )


_KERNEL_FILE_SYSTEMS = (Path("/proc"), Path("/sys"))


def _kind(mode: int) -> str:
    """What a file of this mode is, in words."""
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "not a regular file"


def check_target(target: Path, device: bool = False) -> None:
    """Refuse (InvalidInputError) a restore target the image must not be written to.

    A file target (`device` False) is a path where a regular file may be made:
    an existing regular file (replaced), or a new name in an existing folder
    that is not under /proc or /sys. A device target is an existing block
    device. Nothing else: a character device, FIFO, socket or folder is never
    written to nor replaced.
    """
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InvalidInputError(
            f"cannot use {target} as the restore target: {exc.strerror}; choose another path"
        ) from None
    if device:
        if st is None:
            raise InvalidInputError(
                f"{target} does not exist; --to-device names an existing block device "
                "(use --to PATH to write an image file)"
            )
        if not stat.S_ISBLK(st.st_mode):
            raise InvalidInputError(
                f"{target} is {_kind(st.st_mode)}, not a block device; --to-device writes "
                "only onto a block device (use --to PATH to write an image file)"
            )
        return
    if st is not None and stat.S_ISBLK(st.st_mode):
        raise InvalidInputError(
            f"{target} is a block device; to write the image onto it in place, name it with "
            "--to-device instead of --to"
        )
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise InvalidInputError(
            f"{target} is {_kind(st.st_mode)}; restore writes a regular file (--to PATH) or "
            "onto a block device (--to-device DEVICE) and never replaces anything else: "
            "give the path of a new file"
        )
    absolute = Path(os.path.abspath(target))
    where = Path(os.path.realpath(absolute.parent)) / absolute.name
    for root in _KERNEL_FILE_SYSTEMS:
        if where == root or root in where.parents:
            raise InvalidInputError(
                f"{target} is under {root}, a kernel file system that cannot hold an image; "
                "give a path on a disk"
            )
    folder = where.parent
    if not folder.exists():
        raise InvalidInputError(
            f"the folder {folder} of {target} does not exist; create it first, or give another path"
        )


def _create_partial(target: Path, capacity: int, stored: int) -> tuple[Path, int]:
    """A new temporary file beside `target`, sized to `capacity` (sparse), on a file system
    with room for the `stored` bytes of data blocks; InvalidInputError if not."""
    partial = target.with_name(f".{target.name}.{os.urandom(4).hex()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise InvalidInputError(
            f"cannot create the restore target {target}: {_why(exc)}; give a path in a "
            "folder you can write to"
        ) from None
    try:
        os.ftruncate(fd, capacity)
    except OSError as exc:
        os.close(fd)
        partial.unlink(missing_ok=True)
        if exc.errno == errno.EFBIG:
            raise InvalidInputError(
                f"{target} cannot hold the disk's {capacity} bytes: the file is too large for "
                "its file system or for this process's file-size limit (ulimit -f); give a "
                "path on another file system, or raise the limit"
            ) from None
        raise InvalidInputError(
            f"cannot make {target} {capacity} bytes long: {_why(exc)}; give another path"
        ) from None
    fs = os.fstatvfs(fd)
    free = fs.f_bavail * fs.f_frsize
    if stored > free:
        os.close(fd)
        partial.unlink(missing_ok=True)
        raise InvalidInputError(
            f"no space for {target}: its file system has {_mib(free)} free and the image "
            f"needs {_mib(stored)} (the zero blocks take no space); free space there or "
            "give a path on another file system"
        )
    return partial, fd


def _mib(n: int) -> str:
    """A byte count in MiB, one decimal."""
    return f"{n / (1024 * 1024):.1f} MiB"


def _open_device(target: Path, capacity: int) -> int:
    """The block device open for writing, when no one else uses it and it holds `capacity`
    bytes (InvalidInputError if not)."""
    try:
        # O_EXCL on a block device: an exclusive open, refused while it is mounted or in use
        fd = os.open(target, os.O_WRONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise InvalidInputError(
                f"the block device {target} is in use (mounted, part of a volume, or open "
                "by another program); unmount or release it first, or give another device"
            ) from None
        raise InvalidInputError(
            f"cannot open the block device {target} for writing: {_why(exc)}"
        ) from None
    size = os.lseek(fd, 0, os.SEEK_END)
    if size < capacity:
        os.close(fd)
        raise InvalidInputError(
            f"the block device {target} holds {size} bytes, the disk needs {capacity}; "
            "give a device at least as large"
        )
    return fd


def _zero_unstored(
    fd: int, full: dict[int, BlockRef | None], nblocks: int, block_size: int, capacity: int
) -> None:
    """Write zeros over the blocks that are not stored (all-zero), so the device is exact."""
    zeros = bytes(block_size)
    for index in range(nblocks):
        if full.get(index) is None:
            offset = index * block_size
            _write_all(fd, zeros[: min(block_size, capacity - offset)], offset)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset`: a short write (a disk filling up) is continued,
    so that the error that stops it (ENOSPC, EFBIG, EIO) is raised, never swallowed."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _why(exc: OSError) -> str:
    """An OSError in words: its strerror, and what an errno means for a restore target."""
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


def _write_failure(target: Path, device: bool, exc: OSError, done: int, total: int) -> str:
    """The message of a write that failed midway: where, how far, and what to do."""
    what = f"writing the image to {target} failed after {done} of {total} blocks: {_why(exc)}"
    if device:
        return f"{what}; the device holds a partial image: restore again once it is fixed"
    if exc.errno == errno.ENOSPC:
        return f"{what}; the partial file was removed: free space there, or give another path"
    return f"{what}; the partial file was removed: give another path, or fix the cause and retry"


def _fetch_groups(refs: list[tuple[int, BlockRef]]) -> list[list[tuple[int, BlockRef]]]:
    """Group refs that sit back to back in the same pack, for ranged GETs."""
    by_pack: dict[str, list[tuple[int, BlockRef]]] = {}
    for item in refs:
        by_pack.setdefault(item[1].pack_id, []).append(item)
    groups: list[list[tuple[int, BlockRef]]] = []
    for items in by_pack.values():
        items.sort(key=lambda x: x[1].offset)
        cur: list[tuple[int, BlockRef]] = []
        for item in items:
            ref = item[1]
            if cur:
                start = cur[0][1].offset
                prev = cur[-1][1]
                contiguous = ref.offset == prev.offset + prev.length
                if not contiguous or ref.offset + ref.length - start > MAX_FETCH:
                    groups.append(cur)
                    cur = []
            cur.append(item)
        if cur:
            groups.append(cur)
    return groups


def sha256_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = size
        while remaining > 0:
            chunk = f.read(min(8 * 1024 * 1024, remaining))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()
