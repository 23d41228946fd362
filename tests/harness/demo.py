"""The main job on the embedded default, with no cloud account.

Starts the vCenter simulator (with CBT) and a local S3 endpoint (moto_server),
both over TLS from a throwaway CA, puts data on a simulated VM's two disks,
replicates it with the `connector` CLI, changes some blocks, replicates again,
then restores both runs of both disks and checks them byte for byte.

    python -m tests.harness.demo [--keep DIR]

To try the README's commands by hand, leave a ready environment running:

    python -m tests.harness.demo --up [--dir DIR]     # default DIR: build/demo
    python -m tests.harness.demo --down [--dir DIR]

`--up` starts a supervisor in the background (its pid in DIR/demo.pid) that
runs the simulator, with the VM `demo-web`, and the local S3 endpoint, with an
encrypted bucket, and writes DIR/connector/connector.toml; it prints the config
and the commands to type, and returns. `--down` stops the supervisor by its pid,
which stops both servers; DIR stays (its config, logs and restored images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.harness.ca import make_ca
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import MotoProcess, MotoServer, start_moto
from tests.harness.vcsim import Simulator, start_simulator

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO / "build" / "demo"
UP_TIMEOUT = 180.0  # building the simulator, starting both servers
DOWN_TIMEOUT = 60.0


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_cli(env: ConnectorEnv, *args: str) -> str:
    print(f"$ connector {' '.join(args)}", flush=True)
    proc = env.cli(*args)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stdout.write(proc.stderr)
        raise SystemExit(f"connector {' '.join(args)} failed with exit code {proc.returncode}")
    return proc.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it afterwards")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--up", action="store_true", help="leave a ready environment running")
    mode.add_argument("--down", action="store_true", help="stop the environment of --up")
    mode.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the supervisor
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="the folder of --up/--down")
    args = parser.parse_args()
    if args.up:
        return up(args.dir.absolute())
    if args.down:
        return down(args.dir.absolute())
    if args.serve:
        return serve(args.dir.absolute())
    return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="connector-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)

    say("starting the vCenter simulator and the local S3 endpoint (TLS from a demo CA)")
    ca = make_ca(workdir / "ca")
    sim = start_simulator(workdir / "vcsim", ca)
    moto = start_moto(ca, workdir / "s3")
    try:
        print(f"vCenter: {sim.url}\nS3:      {moto.server.endpoint_url}")
        s3 = make_bucket(moto.server)

        say("creating VM 'demo-web' with two disks (64 MiB and 256 MiB) and writing data")
        uuid, keys = make_vm(sim, rng)
        snapshots = [{k: hashlib.sha256(sim.read_disk(uuid, k)).hexdigest() for k in keys}]

        env = write_config(workdir / "connector", sim, moto.server, "replicas")
        print(f"config: {env.config_file}")
        print(env.config_file.read_text())

        say("the server catalog")
        run_cli(env, "vms")

        say("first replication: a full copy of the allocated areas")
        run_cli(env, "replicate", "demo-web")

        say("changing a few scattered blocks on both disks")
        for key in keys:
            cap = len(sim.read_disk(uuid, key))
            for _ in range(4):
                offset = rng.randrange(0, cap - 50_000)
                sim.write(uuid, key, offset, rng.randbytes(rng.randrange(100, 50_000)))
        snapshots.append({k: hashlib.sha256(sim.read_disk(uuid, k)).hexdigest() for k in keys})

        say("second replication: only the changed blocks (Changed Block Tracking)")
        run_cli(env, "replicate", "demo-web")

        say("run history")
        run_cli(env, "runs")
        runs = env.cli_json("runs", "demo-web")

        say("restoring every disk of every run and checking it byte for byte")
        ok = True
        for run, expected in zip(runs, snapshots, strict=True):
            for key in keys:
                target = workdir / "restore" / f"{run['id']}-disk{key}.img"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                res = env.cli_json(
                    "restore",
                    "demo-web",
                    "--run",
                    run["id"],
                    "--disk",
                    str(key),
                    "--to",
                    str(target),
                )
                match = res["sha256"] == expected[key]
                ok &= match
                print(
                    f"run {run['id']} disk {key}: sha256 {res['sha256'][:16]}... "
                    f"{'matches the disk at that snapshot' if match else 'DOES NOT MATCH'}"
                )

        say("what the bucket holds (opaque names, encrypted content)")
        listing = s3.list_objects_v2(Bucket="replicas").get("Contents", [])
        for obj in listing:
            print(f"{obj['Size']:>10}  {obj['Key']}")
        say("done: every restore is byte-exact" if ok else "FAILED: a restore differs")
        return 0 if ok else 1
    finally:
        moto.stop()
        sim.stop()
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


def make_bucket(server: MotoServer, name: str = "replicas") -> Any:
    """The staging bucket, encrypted by default (as `connector check` asks); its client."""
    s3 = server.boto3_client()
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": server.region})
    s3.put_bucket_encryption(
        Bucket=name,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
        },
    )
    return s3


def make_vm(sim: Simulator, rng: random.Random) -> tuple[str, list[int]]:
    """The VM demo-web with two disks and some data on them: its UUID and disk keys."""
    uuid = sim.add_vm("demo-web", [64 * MiB, 256 * MiB])
    keys = sim.disk_keys(uuid)
    for key in keys:
        cap = len(sim.read_disk(uuid, key))
        for _ in range(10):
            offset = rng.randrange(0, cap - 200_000)
            sim.write(uuid, key, offset, rng.randbytes(rng.randrange(1000, 200_000)))
    return uuid, keys


# ----------------------------------------------------------- a ready environment


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child (not reaped yet) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def up(folder: Path) -> int:
    """Start the supervisor in the background; print the config and what to type."""
    pid_file, ready_file = folder / "demo.pid", folder / "demo.json"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"a demo environment is already running (pid {pid_file.read_text().strip()}); "
              f"stop it with .ci/demo --down --dir {folder}", file=sys.stderr)  # fmt: skip
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("ca", "vcsim", "s3", "connector"):
        shutil.rmtree(folder / stale, ignore_errors=True)
    ready_file.unlink(missing_ok=True)
    log = open(folder / "demo.log", "wb")  # noqa: SIM115 - handed to the supervisor
    with log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.demo", "--serve", "--dir", str(folder)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives this command and its terminal
        )  # fmt: skip
    deadline = time.monotonic() + UP_TIMEOUT
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
            log_text = (folder / "demo.log").read_text(errors="replace")[-3000:]
            print(f"the demo environment did not start:\n{log_text}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    ready = json.loads(ready_file.read_text())
    config = Path(ready["config"])
    print(config.read_text())
    print(f"""The demo environment is running (supervisor pid {ready["pid"]}, in {pid_file}):
  vCenter simulator {ready["vcenter"]}, VM demo-web with two disks
  local S3 endpoint {ready["s3"]}, bucket replicas
  config            {config}

Try the README's commands against it:
  . .venv/bin/activate
  export CONNECTOR_CONFIG={config}
  connector check
  connector vms
  connector replicate demo-web
  connector runs demo-web
  connector restore demo-web --run latest --disk 2000 --to {folder}/demo-web.img

Stop it with:
  .ci/demo --down{"" if folder == DEFAULT_DIR else f" --dir {folder}"}""")
    return 0


def serve(folder: Path) -> int:
    """The supervisor: run both servers until SIGTERM or SIGINT, then stop them."""
    stopping: list[str] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signal.Signals(signum).name)
        raise SystemExit(0)  # unwinds into the finally below, wherever it is

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    sim: Simulator | None = None
    moto: MotoProcess | None = None
    try:
        ca = make_ca(folder / "ca")
        sim = start_simulator(folder / "vcsim", ca)
        moto = start_moto(ca, folder / "s3")
        make_bucket(moto.server)
        make_vm(sim, random.Random(42))
        env = write_config(folder / "connector", sim, moto.server, "replicas")
        (folder / "demo.pid").write_text(f"{os.getpid()}\n")
        ready = {
            "pid": os.getpid(),
            "simulator_pid": sim.process.pid,
            "s3_pid": moto.server.pid,
            "config": str(env.config_file),
            "vcenter": sim.url,
            "s3": moto.server.endpoint_url,
        }
        tmp = folder / "demo.json.tmp"
        tmp.write_text(json.dumps(ready, indent=2))
        tmp.replace(folder / "demo.json")
        print(f"ready: {json.dumps(ready)}", flush=True)
        while True:
            signal.pause()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal: finish stopping
        print(f"stopping ({', '.join(stopping) or 'error'})", flush=True)
        if moto is not None:
            moto.stop()
        if sim is not None:
            sim.stop()
        (folder / "demo.pid").unlink(missing_ok=True)
        (folder / "demo.json").unlink(missing_ok=True)
    return 0


def down(folder: Path) -> int:
    """Stop the supervisor of `up` by its pid and wait until it and its servers are gone."""
    pid_file = folder / "demo.pid"
    if not pid_file.exists():
        print(f"no demo environment is running ({pid_file} does not exist)", file=sys.stderr)
        return 1
    pid = int(pid_file.read_text())
    if not _alive(pid):
        pid_file.unlink()
        print(f"the demo environment (pid {pid}) had already stopped", file=sys.stderr)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"the supervisor (pid {pid}) is still running after {DOWN_TIMEOUT:.0f} s; "
                  f"see {folder / 'demo.log'}", file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.1)
    print(f"stopped the demo environment (pid {pid}); {folder} is kept")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
