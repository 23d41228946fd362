"""Where a full run's time goes: `python -m bench.profile [--size-mib 512] [--target dir|s3]`.

Builds the bench's mixed disk at a smaller size, runs `connector replicate` on it
under py-spy (sampling the real process, idle threads included so that waiting
shows), and prints the
functions with the largest share of the samples, inclusive and self.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import disks  # noqa: E402
from bench.lanes import (  # noqa: E402
    ConnectorCbt,
    ConnectorLocal,
    Services,
    base_env,
    connector_argv,
)
from tests.harness.ca import make_ca  # noqa: E402
from tests.harness.moto import start_moto  # noqa: E402
from tests.harness.vcsim import start_simulator  # noqa: E402

MiB = disks.MiB


# A sample's category: the first rule that matches one of its frames, leaf first.
CATEGORIES = (
    ("start-up: imports", ("_find_and_load",)),
    ("vCenter: login, inventory, snapshot, CBT queries", ("vsphere.py", "pyVmomi", "pyVim")),
    ("seal: zstd 3 + AES-256-GCM", ("StoreKeys.seal",)),
    ("HMAC-SHA-256 block id", ("block_id", "digest (hmac")),
    ("S3 upload (botocore, TLS)", ("botocore", "urllib3", "ssl.py", "s3transfer")),
    ("store write (file, fsync)", ("localstore.py",)),
    ("source read", ("read_extents", "LocalFileReader", "pread", "nbd.py")),
    ("state database (SQLAlchemy, SQLite)", ("sqlalchemy", "sqlite")),
    ("dedup lookup", ("known", "lookup")),
    ("the rest of the pipeline", ("connector/",)),
)


def categorize(frames: list[str]) -> str:
    for name, needles in CATEGORIES:
        for frame in reversed(frames):
            if any(n in frame for n in needles):
                return name
    return "other (interpreter, libraries)"


def summarize(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    cats: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")[1:]  # the first is the thread
        if not frames:
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
        cats[categorize(frames)] += n
    out = [f"{total} samples (main thread and every other, idle included)", "", "by category:"]
    out += [f"  {100 * n / total:5.1f}%  {c}" for c, n in cats.most_common()]
    out += ["", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    out += ["", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    return "\n".join(out)


def py_spy(raw: Path, *argv: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "py-spy"), "record", "--format", "raw",
        "--idle", "--threads", "--rate", "200", "-o", str(raw), "--", *argv,
    ]  # fmt: skip


def profile_cbt(args: argparse.Namespace, work: Path, image: Path, ca: Any, moto: Any) -> int:
    """A full run (not profiled), 2% of the blocks rewritten through the simulator's
    change log, then the incremental under py-spy."""
    sim = start_simulator(work / "vcsim", ca, cbt_page=1000)
    try:
        lane = ConnectorCbt("connector (vCenter sim, CBT)", args.target, Services(work, moto, sim))
        lane.begin(0, "profile")
        lane.attach(image, args.size_mib * MiB)
        env = base_env() | {"CONNECTOR_CONFIG": str(lane.config())}
        replicate = connector_argv("replicate", lane.vm, "--json")
        subprocess.run(replicate, env=env, check=True, stdout=subprocess.DEVNULL)
        (clusters,) = disks.change_rounds(args.size_mib * MiB, seed=34, rounds=1, share=0.02)
        for c in clusters:
            lane.write(c.offset, c.data())
        raw = work / f"profile-cbt-{args.target}.txt"
        subprocess.run(py_spy(raw, *replicate), env=env, check=True, stdout=subprocess.DEVNULL)
        report = summarize(raw, args.top)
        (work / f"summary-cbt-{args.target}.txt").write_text(report + "\n")
        print(report)
        lane.end()
    finally:
        sim.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--target", choices=["dir", "s3"], default="dir")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--cbt",
        action="store_true",
        help="profile an incremental with CBT (2%% changed) through the simulator instead",
    )
    args = parser.parse_args()
    work = args.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    image = work / "disk.img"
    disks.make_mix_image(image, args.size_mib * MiB, seed=12)
    ca = make_ca(work / "ca")
    moto = start_moto(ca, work / "moto")
    if args.cbt:
        try:
            return profile_cbt(args, work, image, ca, moto.server)
        finally:
            moto.stop()
    try:
        lane = ConnectorLocal(
            "connector (local transport)", args.target, Services(work, moto.server, None)
        )
        lane.begin(0, "profile")
        cfg = lane.config(image)
        raw = work / f"profile-{args.target}.txt"
        argv = py_spy(raw, *connector_argv("replicate", lane.vm, "--json"))
        env = base_env() | {"CONNECTOR_CONFIG": str(cfg)}
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
        report = summarize(raw, args.top)
        (work / f"summary-{args.target}.txt").write_text(report + "\n")
        print(report)
        lane.end()
    finally:
        moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
