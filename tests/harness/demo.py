"""The main job on the embedded default, with no cloud account.

Starts the vCenter simulator (with CBT) and a local S3 endpoint (moto_server),
both over TLS from a throwaway CA, puts data on a simulated VM's two disks,
replicates it with the `connector` CLI, changes some blocks, replicates again,
then restores both runs of both disks and checks them byte for byte.

    python -m tests.harness.demo [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tests.harness.ca import make_ca
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.moto import start_moto
from tests.harness.vcsim import start_simulator

MiB = 1024 * 1024


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
    args = parser.parse_args()
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="connector-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)

    say("starting the vCenter simulator and the local S3 endpoint (TLS from a demo CA)")
    ca = make_ca(workdir / "ca")
    sim = start_simulator(workdir / "vcsim", ca)
    moto = start_moto(ca, workdir / "s3")
    try:
        print(f"vCenter: {sim.url}\nS3:      {moto.server.endpoint_url}")
        s3 = moto.server.boto3_client()
        s3.create_bucket(
            Bucket="replicas",
            CreateBucketConfiguration={"LocationConstraint": moto.server.region},
        )

        say("creating VM 'demo-web' with two disks (64 MiB and 256 MiB) and writing data")
        uuid = sim.add_vm("demo-web", [64 * MiB, 256 * MiB])
        keys = sim.disk_keys(uuid)
        for key in keys:
            cap = len(sim.read_disk(uuid, key))
            for _ in range(10):
                offset = rng.randrange(0, cap - 200_000)
                sim.write(uuid, key, offset, rng.randbytes(rng.randrange(1000, 200_000)))
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


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
