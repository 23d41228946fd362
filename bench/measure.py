"""Child processes measured from outside: wall time, CPU seconds from the kernel's
rusage of the child (os.wait4), peak RSS from the child's own VmHWM; and the
machine's own limits."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MiB = 1024 * 1024


@dataclass
class Measured:
    argv: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mib: float
    stdout: str
    stderr: str

    def check(self) -> Measured:
        if self.returncode != 0:
            raise RuntimeError(
                f"{' '.join(self.argv[:6])}... exited {self.returncode}:\n"
                f"{self.stdout[-2000:]}\n{self.stderr[-3000:]}"
            )
        return self


class _Child:
    def __init__(self, argv: Sequence[str], env: dict[str, str], logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        stem = f"{Path(argv[0]).name}-{os.getpid()}-{time.monotonic_ns()}"
        self.out_path = logdir / f"{stem}.out"
        self.err_path = logdir / f"{stem}.err"
        self.argv = list(argv)
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
            )
        self.hwm_kib = 0
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        """Follow the child's VmHWM (its peak RSS since exec) until it exits.

        Not ru_maxrss: a child forked from this (large) Python process carries the
        parent's RSS from before its exec into ru_maxrss, which would hide the
        child's own peak under ours.
        """
        status = Path(f"/proc/{self.proc.pid}/status")
        while True:
            try:
                text = status.read_text()
            except OSError:
                return
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    self.hwm_kib = max(self.hwm_kib, int(line.split()[1]))
                    break
            else:
                return  # a zombie: its memory is gone
            time.sleep(0.02)

    def wait(self, timeout: float) -> Measured:
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - self.started
        self._sampler.join(timeout=1)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return Measured(
            argv=self.argv,
            returncode=self.proc.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            peak_rss_mib=self.hwm_kib / 1024,
            stdout=self.out_path.read_text(errors="replace"),
            stderr=self.err_path.read_text(errors="replace"),
        )


def run(argv: Sequence[str], env: dict[str, str], logdir: Path, timeout: float = 3600) -> Measured:
    """Run one child to its end and measure it."""
    return _Child(argv, env, logdir).wait(timeout)


def run_together(
    argvs: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]],
    logdir: Path,
    timeout: float = 3600,
) -> tuple[float, list[Measured]]:
    """Start every child at once; the wall time is until the last one ends."""
    start = time.monotonic()
    children = [_Child(a, e, logdir) for a, e in zip(argvs, envs, strict=True)]
    results = [c.wait(timeout) for c in children]
    return time.monotonic() - start, results


# ----------------------------------------------------------------- machine limits


def read_throughput(path: Path, seconds_cap: float = 60.0) -> dict[str, float]:
    """Read the whole image (holes included) to nowhere: the source's ceiling."""
    size = path.stat().st_size
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    start = time.monotonic()
    done = 0
    with open(path, "rb", buffering=0) as f:
        while done < size and time.monotonic() - start < seconds_cap:
            n = f.readinto(view)
            if not n:
                break
            done += n
    wall = time.monotonic() - start
    return {"bytes": done, "seconds": wall, "mib_s": done / MiB / wall}


def _samples() -> dict[str, bytes]:
    rng = np.random.default_rng(7)
    from bench.disks import text_bytes

    return {"text": text_bytes(rng, MiB), "random": rng.bytes(MiB)}


def _kernel(name: str, seconds: float) -> float:
    """MiB/s of one kernel on one core, over about `seconds`."""
    import zstandard
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    samples = _samples()
    key = b"k" * 32
    aead = AESGCM(AESGCM.generate_key(256))
    cctx = zstandard.ZstdCompressor(level=3)
    ops = {
        "hmac-sha256": lambda: hmac.digest(key, samples["random"], hashlib.sha256),
        "zstd3-text": lambda: cctx.compress(samples["text"]),
        "zstd3-random": lambda: cctx.compress(samples["random"]),
        "aes256-gcm": lambda: aead.encrypt(b"n" * 12, samples["random"], None),
    }
    op = ops[name]
    n = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        op()
        n += 1
    return n / (time.monotonic() - start)  # 1 MiB per op


KERNELS = ("hmac-sha256", "zstd3-text", "zstd3-random", "aes256-gcm")


def _kernel_star(args: tuple[str, float]) -> float:
    return _kernel(*args)


def cpu_limits(seconds: float) -> dict[str, dict[str, float]]:
    """Each kernel's MiB/s on one core and on all cores (one process per core)."""
    cores = os.cpu_count() or 1
    out: dict[str, dict[str, float]] = {}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(cores) as pool:
        for name in KERNELS:
            one = _kernel(name, seconds)
            every = sum(pool.map(_kernel_star, [(name, seconds)] * cores))
            out[name] = {"per_core_mib_s": one, "all_cores_mib_s": every, "cores": cores}
    return out
