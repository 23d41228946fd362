"""The contenders, each on one target: a lane. Every lane is a real program run as a
child process (the connector through its CLI), measured by bench.measure.

A lane is set up fresh for each repetition (`begin`), runs once per scenario step
(`run`: a full run, then each incremental on the same target), and is torn down
(`end`), so that the runs of one repetition see the store the previous ones left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.measure import Measured, run
from tests.harness.moto import MotoServer
from tests.harness.vcsim import Simulator

REPO = Path(__file__).resolve().parent.parent

DIR, S3 = "dir", "s3"


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    # Trust is passed to every program explicitly, never taken from the environment.
    for name in (
        "CONNECTOR_CONFIG",
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
    ):
        env.pop(name, None)
    env["COLUMNS"] = "200"
    return env


@dataclass
class Services:
    """The servers of one bench run, shared by every lane."""

    work: Path
    moto: MotoServer
    sim: Simulator | None

    def s3_client(self) -> Any:
        return self.moto.boto3_client()

    def new_bucket(self, name: str) -> str:
        self.s3_client().create_bucket(
            Bucket=name, CreateBucketConfiguration={"LocationConstraint": self.moto.region}
        )
        return name

    def drop_bucket(self, name: str) -> None:
        s3 = self.s3_client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys})
        for up in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
            s3.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
        s3.delete_bucket(Bucket=name)

    def bucket_bytes(self, name: str) -> int:
        total = 0
        for page in self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=name):
            total += sum(o["Size"] for o in page.get("Contents", []))
        return total

    def s3_secret_file(self) -> Path:
        path = self.work / "s3-secret"
        if not path.exists():
            path.write_text(self.moto.secret_key + "\n")
            path.chmod(0o600)
        return path


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


@dataclass
class Step:
    """What one lane run gives back."""

    measured: Measured
    bytes_read: int
    bytes_uploaded: int
    note: str = ""


@dataclass
class Lane:
    contender: str
    target: str
    services: Services
    label: str = ""
    workdir: Path = field(default=Path("."))
    bucket: str | None = None
    rep: int = 0

    @property
    def name(self) -> str:
        return f"{self.contender} -> {'local dir' if self.target == DIR else 'moto S3 (TLS)'}"

    @property
    def store_dir(self) -> Path:
        return self.workdir / "target"

    def begin(self, rep: int, scenario: str) -> None:
        self.rep = rep
        slug = f"{self.contender}-{self.target}-{scenario}-{rep}".replace(" ", "")
        self.workdir = self.services.work / "lanes" / slug
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        if self.target == S3:
            bucket = "b-" + "".join(c for c in slug.lower() if c.isalnum() or c == "-")[:50]
            self.bucket = self.services.new_bucket(bucket)

    def end(self) -> None:
        if self.bucket is not None:
            self.services.drop_bucket(self.bucket)
            self.bucket = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def stored(self) -> int:
        if self.target == S3:
            assert self.bucket is not None
            return self.services.bucket_bytes(self.bucket)
        return dir_bytes(self.store_dir) if self.store_dir.exists() else 0

    # Programs that send the whole file again whenever it changed (rclone, boto3):
    # what they upload is the file, even where it replaces an object of the same size.
    sends_whole_file = False

    def step(self, image: Path) -> Step:
        before = self.stored()
        measured, read = self._run(image)
        grown = self.stored() - before
        return Step(measured, read, image.stat().st_size if self.sends_whole_file else grown)

    def _run(self, image: Path) -> tuple[Measured, int]:
        raise NotImplementedError


# ----------------------------------------------------------------------- connector


def connector_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "connector", *args]


def store_section(lane: Lane) -> str:
    if lane.target == DIR:
        return f'[store]\nkind = "local"\npath = {toml(lane.store_dir)}\n'
    m = lane.services.moto
    values = {
        "bucket": lane.bucket,
        "prefix": "replicas",
        "region": m.region,
        "endpoint_url": m.endpoint_url,
        "ca_file": m.ca_file,
        "access_key_id": m.access_key,
        "secret_access_key_file": lane.services.s3_secret_file(),
    }
    return "[s3]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in values.items())


def local_vm_section(name: str, disk: str) -> str:
    return f"[[local.vms]]\nname = {toml(name)}\nquiescent = true\n[[local.vms.disks]]\n{disk}\n"


def bytes_read_of(run_json: str) -> int:
    doc = json.loads(run_json)
    return sum(int(d.get("bytes_read") or 0) for d in doc.get("disks", []))


class ConnectorLocal(Lane):
    """The connector's local transport reading the image file (no CBT: a full read
    first, then a block compare)."""

    vm = "bench-vm"

    def config(self, image: Path) -> Path:
        cfg = self.workdir / "connector.toml"
        if not cfg.exists():
            cfg.write_text(
                store_section(self)
                + f"[state]\npath = {toml(self.workdir / 'state' / 'state.db')}\n"
                + '[transport]\nkind = "local"\n'
                + local_vm_section(self.vm, f"path = {toml(image)}")
            )
        return cfg

    def _run(self, image: Path) -> tuple[Measured, int]:
        env = base_env() | {"CONNECTOR_CONFIG": str(self.config(image))}
        m = run(connector_argv("replicate", self.vm, "--json"), env, self.workdir / "logs").check()
        return m, bytes_read_of(m.stdout)


class ConnectorCbt(Lane):
    """The connector against the vCenter simulator (datastore HTTPS reads, CBT): the
    image is copied into a new simulated VM's disk, each round's writes go through
    the simulator's change log."""

    uuid: str = ""
    key: int = 0

    def begin(self, rep: int, scenario: str) -> None:
        super().begin(rep, scenario)
        self.uuid = ""

    def attach(self, base: Path, capacity: int) -> None:
        sim = self.services.sim
        assert sim is not None
        self.vm = f"cbt-{self.target}-{self.workdir.name}"[:70]
        self.uuid = sim.add_vm(self.vm, [capacity])
        self.key = sim.disk_keys(self.uuid)[0]
        flat = sim.disk_path(self.uuid, self.key)
        subprocess.run(["cp", "--sparse=always", str(base), str(flat)], check=True)

    def write(self, offset: int, data: bytes) -> None:
        assert self.services.sim is not None
        self.services.sim.write(self.uuid, self.key, offset, data)

    def config(self) -> Path:
        sim = self.services.sim
        assert sim is not None
        cfg = self.workdir / "connector.toml"
        if not cfg.exists():
            cfg.write_text(
                f"[vcenter]\nurl = {toml(sim.url)}\nuser = {toml(sim.user)}\n"
                f"password_file = {toml(sim.password_file)}\nca_file = {toml(sim.ca_file)}\n"
                + store_section(self)
                + f"[state]\npath = {toml(self.workdir / 'state' / 'state.db')}\n"
            )
            env = base_env() | {"CONNECTOR_CONFIG": str(cfg)}
            run(connector_argv("vms", "--json"), env, self.workdir / "logs").check()
        return cfg

    def _run(self, image: Path) -> tuple[Measured, int]:
        env = base_env() | {"CONNECTOR_CONFIG": str(self.config())}
        m = run(connector_argv("replicate", self.vm, "--json"), env, self.workdir / "logs").check()
        return m, bytes_read_of(m.stdout)


# ------------------------------------------------------------------------- the peers


class Restic(Lane):
    """restic (Debian) backing up the image file; its own cache, kept between runs."""

    def env(self) -> dict[str, str]:
        env = base_env() | {
            "RESTIC_PASSWORD": "bench-password",
            "RESTIC_CACHE_DIR": str(self.workdir / "cache"),
        }
        if self.target == S3:
            m = self.services.moto
            env |= {
                "AWS_ACCESS_KEY_ID": m.access_key,
                "AWS_SECRET_ACCESS_KEY": m.secret_key,
                "AWS_DEFAULT_REGION": m.region,
            }
        return env

    def repo(self) -> list[str]:
        if self.target == DIR:
            return ["-r", str(self.store_dir)]
        m = self.services.moto
        host = m.endpoint_url.removeprefix("https://")
        return ["-r", f"s3:https://{host}/{self.bucket}/restic", "--cacert", str(m.ca_file)]

    def begin(self, rep: int, scenario: str) -> None:
        super().begin(rep, scenario)
        run(["restic", *self.repo(), "init"], self.env(), self.workdir / "logs").check()

    def _run(self, image: Path) -> tuple[Measured, int]:
        argv = ["restic", *self.repo(), "backup", "--json", "--host", "bench", str(image)]
        m = run(argv, self.env(), self.workdir / "logs").check()
        summary = [
            json.loads(line)
            for line in m.stdout.splitlines()
            if line.startswith("{") and '"summary"' in line
        ]
        read = int(summary[-1].get("total_bytes_processed", 0)) if summary else 0
        return m, read


class Rclone(Lane):
    """rclone (Debian) copying the image file (whole, whenever it changed)."""

    sends_whole_file = True

    def env(self) -> dict[str, str]:
        m = self.services.moto
        return base_env() | {
            "RCLONE_CONFIG": "/dev/null",
            "RCLONE_CONFIG_BENCHS3_TYPE": "s3",
            "RCLONE_CONFIG_BENCHS3_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCHS3_ACCESS_KEY_ID": m.access_key,
            "RCLONE_CONFIG_BENCHS3_SECRET_ACCESS_KEY": m.secret_key,
            "RCLONE_CONFIG_BENCHS3_ENDPOINT": m.endpoint_url,
            "RCLONE_CONFIG_BENCHS3_REGION": m.region,
        }

    def _run(self, image: Path) -> tuple[Measured, int]:
        if self.target == DIR:
            self.store_dir.mkdir(exist_ok=True)
            dest = str(self.store_dir / image.name)
            extra: list[str] = []
        else:
            dest = f"benchs3:{self.bucket}/rclone/{image.name}"
            extra = ["--ca-cert", str(self.services.moto.ca_file)]
        argv = ["rclone", "copyto", *extra, str(image), dest]
        m = run(argv, self.env(), self.workdir / "logs").check()
        return m, image.stat().st_size


BOTO3_UPLOAD = """
import sys, boto3
from botocore.config import Config
endpoint, ca, region, key_id, secret, bucket, key, path = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca, region_name=region,
    aws_access_key_id=key_id, aws_secret_access_key=secret,
    config=Config(s3={"addressing_style": "path"}))
s3.upload_file(path, bucket, key)
"""


class Boto3Upload(Lane):
    """boto3's `upload_file` of the raw image (its default TransferConfig)."""

    sends_whole_file = True

    def _run(self, image: Path) -> tuple[Measured, int]:
        m = self.services.moto
        argv = [
            sys.executable,
            "-c",
            BOTO3_UPLOAD,
            m.endpoint_url,
            str(m.ca_file),
            m.region,
            m.access_key,
            m.secret_key,
            str(self.bucket),
            f"boto3/{image.name}",
            str(image),
        ]
        measured = run(argv, base_env(), self.workdir / "logs").check()
        return measured, image.stat().st_size


CONTENDERS: dict[str, type[Lane]] = {
    "connector (local transport)": ConnectorLocal,
    "connector (vCenter sim, CBT)": ConnectorCbt,
    "restic": Restic,
    "rclone": Rclone,
    "boto3 upload_file": Boto3Upload,
}


def make_lanes(services: Services, contenders: list[str], targets: list[str]) -> list[Lane]:
    lanes: list[Lane] = []
    for contender in contenders:
        for target in targets:
            if contender == "boto3 upload_file" and target == DIR:
                continue  # boto3 uploads to S3 only
            lanes.append(CONTENDERS[contender](contender, target, services))
    return lanes
