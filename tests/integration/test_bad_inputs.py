"""Bad input through the `connector` command: a message and exit 2 (or 1), never a traceback.

Restore writes only a regular file (`--to`) or onto a block device named with
`--to-device`; it never replaces a device node, FIFO, socket or folder, and it
refuses paths where no file can be made. Ids and counts from the command line
are checked before they reach an object key or the state database. The config
takes true/false only for its booleans, and says so when given a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.fixtures_s3 import _remove_bucket
from tests.integration.store_helpers import MiB

pytestmark = pytest.mark.integration

VM = "inputs-vm"
DISK_SIZE = 8 * MiB
GOOD_RUN = "r-20000101T000000000Z-00000000"  # well formed; the store has no such run


@dataclass
class Replica:
    env: ConnectorEnv
    run_id: str
    disk_key: int
    sha256: str


@pytest.fixture(scope="module")
def replica(vcsim: Any, moto: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """One VM replicated once into a bucket of its own, shared by the tests of this module."""
    bucket = f"t-inputs-{os.urandom(6).hex()}"
    client = moto.boto3_client()
    client.create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": moto.region}
    )
    try:
        env = write_config(tmp_path_factory.mktemp("inputs"), vcsim, moto, bucket)
        uuid = vcsim.add_vm(VM, [DISK_SIZE])
        (key,) = vcsim.disk_keys(uuid)
        for index in (0, 1, 5):
            vcsim.write(uuid, key, index * MiB, bytes([index + 1]) * MiB)
        run = env.cli_json("replicate", VM)
        assert run["state"] == "COMPLETED", run
        yield Replica(env, run["id"], key, hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest())
    finally:
        _remove_bucket(client, bucket)


def _limit_file_size(limit: int) -> Callable[[], None]:
    """A preexec_fn: files of the child may not grow beyond `limit` bytes (RLIMIT_FSIZE)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@dataclass
class Case:
    """One bad input: the command, the exit status and the words its message must hold."""

    args: Callable[[Replica, Path], list[str]]
    status: int
    says: list[str]
    config: Callable[[Replica, Path], Path] | None = None  # another config file to use
    preexec: Callable[[], None] | None = None
    node: Callable[[Path], Path] | None = None  # a node that must be left as it was
    absent: list[str] = field(default_factory=list)  # names that must not exist afterwards


def restore_to(target: Callable[[Path], str], *extra: str) -> Callable[[Replica, Path], list[str]]:
    def args(r: Replica, tmp: Path) -> list[str]:
        return ["restore", VM, "--run", r.run_id, "--disk", str(r.disk_key), *extra, target(tmp)]

    return args


def restore_with(
    run: Callable[[Replica], str] = lambda r: r.run_id,
    disk: Callable[[Replica], str] = lambda r: str(r.disk_key),
) -> Callable[[Replica, Path], list[str]]:
    """`restore` of the replica to a new file, with another --run or --disk."""

    def args(r: Replica, tmp: Path) -> list[str]:
        return ["restore", VM, "--run", run(r), "--disk", disk(r), "--to", str(tmp / "x.img")]

    return args


def _char_device(tmp: Path) -> Path:
    """A character device node made for the test: the same device as /dev/full."""
    node = tmp / "full-node"
    if not node.exists():
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 7))
    return node


def _block_device(tmp: Path) -> Path:
    """A block device node made for the test (loop device 7,250; never opened)."""
    node = tmp / "block-node"
    if not node.exists():
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 250))
    return node


def _existing(tmp: Path) -> Path:
    """A regular file that holds something already."""
    path = tmp / "existing.img"
    if not path.exists():
        path.write_bytes(b"keep me")
    return path


def _fifo(tmp: Path) -> Path:
    node = tmp / "fifo"
    if not node.exists():
        os.mkfifo(node, 0o600)
    return node


_SOCKETS: list[socket.socket] = []


def _socket(tmp: Path) -> Path:
    node = tmp / "sock"
    if not node.exists():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(node))
        _SOCKETS.append(sock)
    return node


def _config_with(text: str) -> Callable[[Replica, Path], Path]:
    def make(r: Replica, tmp: Path) -> Path:
        cfg = tmp / "edited.toml"
        body = r.env.config_file.read_text()
        cfg.write_text(body.replace("[vcenter]\n", f"[vcenter]\n{text}\n", 1))
        return cfg

    return make


def _folder_config(r: Replica, tmp: Path) -> Path:
    folder = tmp / "conf.d"
    folder.mkdir(exist_ok=True)
    return folder


CASES: dict[str, Case] = {
    "to /dev/null": Case(
        restore_to(lambda t: "/dev/null", "--to"),
        2,
        ["/dev/null is a character device", "never replaces", "--to-device"],
        node=lambda t: Path("/dev/null"),
    ),
    "to a character device made for the test": Case(
        restore_to(lambda t: str(_char_device(t)), "--to"),
        2,
        ["is a character device", "give the path of a new file"],
        node=_char_device,
    ),
    "to a block device without --to-device": Case(
        restore_to(lambda t: str(_block_device(t)), "--to"),
        2,
        ["is a block device", "name it with --to-device"],
        node=_block_device,
    ),
    "to a FIFO": Case(
        restore_to(lambda t: str(_fifo(t)), "--to"), 2, ["is a FIFO (named pipe)"], node=_fifo
    ),
    "to a socket": Case(
        restore_to(lambda t: str(_socket(t)), "--to"), 2, ["is a socket"], node=_socket
    ),
    "to a folder": Case(restore_to(lambda t: str(t), "--to"), 2, ["is a folder", "new file"]),
    "to a file under /proc": Case(
        restore_to(lambda t: "/proc/connector-restore.img", "--to"),
        2,
        ["/proc/connector-restore.img is under /proc", "give a path on a disk"],
    ),
    "to a file under /sys": Case(
        restore_to(lambda t: "/sys/connector-restore.img", "--to"),
        2,
        ["/sys/connector-restore.img is under /sys", "give a path on a disk"],
    ),
    "into a missing folder": Case(
        restore_to(lambda t: str(t / "missing" / "disk.img"), "--to"),
        2,
        ["missing of", "does not exist; create it first"],
    ),
    "to an existing file": Case(
        restore_to(lambda t: str(_existing(t)), "--to"),
        2,
        ["already exists; remove it or choose another path"],
        node=_existing,
    ),
    "larger than the file-size limit (EFBIG)": Case(
        restore_to(lambda t: str(t / "big.img"), "--to"),
        2,
        ["big.img cannot hold the disk's", "too large", "ulimit -f"],
        preexec=_limit_file_size(2 * MiB),
        absent=["big.img", ".big.img*"],
    ),
    "--to-device onto a regular file": Case(
        restore_to(lambda t: str(_existing(t)), "--to-device"),
        2,
        ["is a regular file, not a block device", "use --to PATH"],
        node=_existing,
    ),
    "--to-device onto a character device": Case(
        restore_to(lambda t: str(_char_device(t)), "--to-device"),
        2,
        ["is a character device, not a block device"],
        node=_char_device,
    ),
    "--to-device onto nothing": Case(
        restore_to(lambda t: str(t / "no-such-device"), "--to-device"),
        2,
        ["does not exist; --to-device names an existing block device"],
        absent=["no-such-device"],
    ),
    "both --to and --to-device": Case(
        restore_to(lambda t: str(t / "x.img"), "--to-device", "/dev/null", "--to"),
        2,
        ["give exactly one target"],
    ),
    "restore --run ../../config": Case(
        restore_with(run=lambda r: "../../config"),
        2,
        ["'../../config' is not a run id", "r-YYYYMMDDTHHMMSSmmmZ-<8 hex digits>"],
        absent=["x.img"],
    ),
    "restore --run with a slash": Case(
        restore_with(run=lambda r: f"{r.run_id}/commit"), 2, ["is not a run id"]
    ),
    "restore --run in upper case": Case(
        restore_with(run=lambda r: r.run_id.upper()), 2, ["is not a run id"]
    ),
    "restore --disk negative": Case(
        restore_with(disk=lambda r: "-1"), 2, ["-1 is not a disk key", "0 to 2147483647"]
    ),
    "restore --disk huge": Case(
        restore_with(disk=lambda r: str(10**30)), 2, [f"{10**30} is not a disk key"]
    ),
    "verify --run ../../config": Case(
        lambda r, t: ["verify", "--run", "../../config"], 2, ["'../../config' is not a run id"]
    ),
    "verify VM --run ../x": Case(
        lambda r, t: ["verify", VM, "--run", "../x"], 2, ["'../x' is not a run id"]
    ),
    "retention with a huge count": Case(
        lambda r, t: ["retention", VM, str(10**30)],
        2,
        ["runs to keep must be a whole number from 0 (keep all) to 1000000"],
    ),
    "retention with a negative count": Case(
        lambda r, t: ["retention", VM, "--", "-3"],
        2,
        ["runs to keep must be a whole number from 0 (keep all) to 1000000, not -3"],
    ),
    "purge --keep negative": Case(
        lambda r, t: ["purge", VM, "--keep", "-1", "--dry-run"],
        2,
        ["--keep must be a whole number from 0 (keep all) to 1000000, not -1"],
    ),
    "purge --keep huge": Case(
        lambda r, t: ["purge", VM, "--keep", str(10**30), "--dry-run"],
        2,
        ["--keep must be a whole number"],
    ),
    "jobs create with a huge frequency": Case(
        lambda r, t: ["jobs", "create", VM, "-f", str(10**30)],
        2,
        [f"frequency {10**30} is out of range"],
    ),
    "jobs create with a huge retention": Case(
        lambda r, t: ["jobs", "create", VM, "-f", "2", "-r", str(10**30)],
        2,
        [f"retention {10**30} is out of range"],
    ),
    'enable_cbt = "yes"': Case(
        lambda r, t: ["runs"],
        2,
        ["edited.toml is invalid", "vcenter.enable_cbt: must be true or false", "without quotes"],
        config=_config_with('enable_cbt = "yes"'),
    ),
    "enable_cbt = 1": Case(
        lambda r, t: ["runs"],
        2,
        ["vcenter.enable_cbt: must be true or false"],
        config=_config_with("enable_cbt = 1"),
    ),
    "a folder as the config file": Case(
        lambda r, t: ["runs"],
        2,
        ["conf.d is a folder, not a file", "conf.d/connector.toml"],
        config=_folder_config,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_a_message(replica: Replica, name: str, tmp_path: Path) -> None:
    case = CASES[name]
    args = case.args(replica, tmp_path)
    if case.config is not None:
        args += ["--config", str(case.config(replica, tmp_path))]
    before = None
    if case.node is not None:
        node = case.node(tmp_path)
        before = os.stat(node)
    try:
        proc = replica.env.cli(*args, preexec_fn=case.preexec)
    finally:
        while _SOCKETS:
            _SOCKETS.pop().close()
    assert proc.returncode == case.status, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    message = " ".join(proc.stderr.split())  # rich may wrap long lines
    for words in case.says:
        assert words in message, message
    if case.node is not None:
        assert before is not None
        after = os.stat(case.node(tmp_path))
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode)
        assert (after.st_rdev, after.st_ino) == (before.st_rdev, before.st_ino)
        if stat.S_ISREG(before.st_mode):  # a file's content is untouched too
            assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    for pattern in case.absent:
        assert not list(tmp_path.glob(pattern)), pattern


def test_restore_within_the_file_size_limit_still_writes_the_image(
    replica: Replica, tmp_path: Path
) -> None:
    out = tmp_path / "disk.img"
    proc = replica.env.cli(
        "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
        "--to", str(out), "--json", preexec_fn=_limit_file_size(DISK_SIZE),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f'"sha256": "{replica.sha256}"' in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["disk.img"]


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `where` for the block, with mount `options` (size=..., ro)."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_restore_onto_a_read_only_file_system_is_refused(replica: Replica, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        proc = replica.env.cli(
            "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
            "--to", str(ro / "disk.img"),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        message = " ".join(proc.stderr.split())
        assert f"cannot create the restore target {ro / 'disk.img'}" in message
        assert "the file system is read-only" in message and "a folder you can write to" in message
        assert list(ro.iterdir()) == []


def test_restore_onto_a_file_system_without_room_is_refused(
    replica: Replica, tmp_path: Path
) -> None:
    # 3 MiB of stored blocks in an 8 MiB sparse image: 2 MiB of room is not enough
    with tmpfs(tmp_path / "small", "size=2m") as small:
        target = small / "disk.img"
        proc = replica.env.cli(
            "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
            "--to", str(target),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        message = " ".join(proc.stderr.split())
        assert f"no space for {target}: its file system has 2.0 MiB free" in message
        assert "the image needs 3.0 MiB" in message and "free space there" in message
        assert list(small.iterdir()) == []


@contextlib.contextmanager
def loop_device(backing: Path, size: int, fill: bytes, sparse: bool = False) -> Iterator[Path]:
    """A loop block device over a file of `size` bytes of `fill` (or a sparse file of `size`
    bytes), detached afterwards."""
    if sparse:
        with open(backing, "wb") as f:
            f.truncate(size)
    else:
        backing.write_bytes(fill * (size // len(fill)))
    found = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    )
    device = Path(found.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)


def test_restore_to_device_writes_a_block_device_in_place(replica: Replica, tmp_path: Path) -> None:
    # the device holds old data everywhere: the unstored (zero) blocks must be zeroed too
    with loop_device(tmp_path / "backing", DISK_SIZE + MiB, b"\xaa") as device:
        before = os.stat(device)
        proc = replica.env.cli(
            "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
            "--to-device", str(device), "--json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f'"sha256": "{replica.sha256}"' in proc.stdout
        with open(device, "rb") as f:
            image = f.read(DISK_SIZE)
            beyond = f.read()
        assert hashlib.sha256(image).hexdigest() == replica.sha256
        assert beyond == b"\xaa" * MiB  # nothing past the disk's end is touched
        after = os.stat(device)
        assert stat.S_ISBLK(after.st_mode) and after.st_rdev == before.st_rdev


def test_restore_to_device_smaller_than_the_disk_is_refused(
    replica: Replica, tmp_path: Path
) -> None:
    with loop_device(tmp_path / "backing", DISK_SIZE // 2, b"\x55") as device:
        proc = replica.env.cli(
            "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
            "--to-device", str(device),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        message = " ".join(proc.stderr.split())
        assert f"the block device {device} holds {DISK_SIZE // 2} bytes" in message
        assert "give a device at least as large" in message
        with open(device, "rb") as f:
            assert f.read() == b"\x55" * (DISK_SIZE // 2)


def test_restore_to_device_that_fails_midway_exits_1(replica: Replica, tmp_path: Path) -> None:
    # a loop device of the disk's size over a sparse file on a 2 MiB tmpfs: the device
    # takes the first writes, then its backing store is full and writes fail (EIO)
    with (
        tmpfs(tmp_path / "small", "size=2m") as small,
        loop_device(small / "backing", DISK_SIZE, b"\0", sparse=True) as device,
    ):
        proc = replica.env.cli(
            "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
            "--to-device", str(device),
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        message = " ".join(proc.stderr.split())
        assert f"writing the image to {device} failed after" in message
        assert "the device holds a partial image: restore again once it is fixed" in message
        assert stat.S_ISBLK(os.stat(device).st_mode)


def test_restore_to_device_in_use_is_refused(replica: Replica, tmp_path: Path) -> None:
    # an exclusive open, as a mount holds one: the connector must not write under it
    with loop_device(tmp_path / "backing", DISK_SIZE, b"\x33") as device:
        holder = os.open(device, os.O_RDONLY | os.O_EXCL)
        try:
            proc = replica.env.cli(
                "restore", VM, "--run", replica.run_id, "--disk", str(replica.disk_key),
                "--to-device", str(device),
            )  # fmt: skip
        finally:
            os.close(holder)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        message = " ".join(proc.stderr.split())
        assert f"the block device {device} is in use" in message
        assert "unmount or release it first" in message
        with open(device, "rb") as f:
            assert f.read() == b"\x33" * DISK_SIZE
