"""One bench run: disks, servers, every lane on the same data, reports."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import disks, measure
from bench.lanes import (
    CONTENDERS,
    DIR,
    S3,
    ConnectorCbt,
    Lane,
    Services,
    Step,
    base_env,
    connector_argv,
    local_vm_section,
    make_lanes,
    toml,
)
from tests.harness.ca import make_ca
from tests.harness.moto import start_moto
from tests.harness.nbd import NbdServer, start_nbdkit
from tests.harness.vcsim import start_simulator

MiB = disks.MiB
GiB = 1024 * MiB

SIM_CONTENDER = "connector (vCenter sim, CBT)"


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run; `quick` is the CI smoke test's."""

    quick: bool
    reps: int
    mix_size: int
    rounds: int
    change_share: float
    sparse_capacity: int
    sparse_data: int
    concurrent_vms: int
    concurrent_size: int
    latency_ms: int
    discovery_per_pool: int  # the VPX model has two resource pools
    limit_seconds: float

    @staticmethod
    def make(quick: bool, reps: int | None) -> Plan:
        if quick:
            return Plan(
                True, reps or 1, 48 * MiB, 1, 0.02, 256 * MiB, 16 * MiB, 2, 8 * MiB, 20, 25, 0.2
            )
        return Plan(False, reps or 3, 4 * GiB, 3, 0.02, 256 * GiB, GiB, 4, 256 * MiB, 20, 2500, 2.0)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _row(scenario: str, lane: Lane, steps: list[Step], source_bytes: int) -> dict[str, Any]:
    reps = [
        {
            "wall_s": s.measured.wall_s,
            "cpu_s": s.measured.cpu_s,
            "peak_rss_mib": s.measured.peak_rss_mib,
            "bytes_read": s.bytes_read,
            "bytes_uploaded": s.bytes_uploaded,
        }
        for s in steps
    ]
    med = {k: _median([r[k] for r in reps]) for k in reps[0]} if reps else {}
    if med:
        med["source_mib_s"] = source_bytes / MiB / med["wall_s"] if med["wall_s"] else 0.0
    return {
        "scenario": scenario,
        "contender": lane.contender,
        "target": lane.target,
        "lane": lane.name,
        "source_bytes": source_bytes,
        "repetitions": reps,
        "median": med,
    }


class Bench:
    def __init__(
        self,
        plan: Plan,
        out: Path,
        work: Path,
        contenders: list[str],
        targets: list[str],
        log: Any = print,
    ) -> None:
        self.plan = plan
        self.out = out
        self.work = work
        self.contenders = contenders
        self.targets = targets
        self.log = log
        self.rows: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}

    # ------------------------------------------------------------------ scaffolding

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.out.mkdir(parents=True, exist_ok=True)
        ca = make_ca(self.work / "ca")
        moto = start_moto(ca, self.work / "moto")
        sim = start_simulator(self.work / "vcsim", ca, cbt_page=1000)
        try:
            services = Services(self.work, moto.server, sim)
            # The longest section last; the reports are rewritten after each one, so a
            # run cut short still leaves what it measured.
            self.mixed(services)
            self.report(started)
            sim.stop()
            self.discovery(ca)
            self.report(started)
            self.concurrency(services)
            self.report(started)
            self.limits()
            self.report(started)
            self.sparse(services)
        finally:
            sim.stop()
            moto.stop()
        return self.report(started, final=True)

    def report(self, started: float, final: bool = False) -> dict[str, Any]:
        result = {
            "bench": "connector side by side with restic, rclone and boto3",
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "plan": self.plan.__dict__,
            "seconds": time.monotonic() - started,
            "complete": final,
            "results": self.rows,
            **self.extra,
        }
        from bench.report import evaluate_targets, write_reports

        result["targets"] = evaluate_targets(result)
        write_reports(result, self.out)
        return result

    def lanes(self, services: Services, contenders: list[str] | None = None) -> list[Lane]:
        chosen = [c for c in (contenders or self.contenders) if c in self.contenders]
        return make_lanes(services, chosen, self.targets)

    # ------------------------------------------------------- the mixed disk and rounds

    def mixed(self, services: Services) -> None:
        p = self.plan
        base = self.work / "mix-base.img"
        self.log(f"building the mixed disk ({p.mix_size // MiB} MiB)")
        layout = disks.make_mix_image(base, p.mix_size, seed=12)
        rounds = disks.change_rounds(p.mix_size, seed=34, rounds=p.rounds, share=p.change_share)
        image = self.work / "disk.img"
        lanes = self.lanes(services)
        steps: dict[tuple[str, int], list[Step]] = {}
        sources: dict[int, int] = {}
        changed: dict[int, int] = {}
        for rep in range(p.reps):
            subprocess.run(["cp", "--sparse=always", str(base), str(image)], check=True)
            order = lanes[rep % len(lanes) :] + lanes[: rep % len(lanes)]
            for lane in order:
                lane.begin(rep, "mix")
                if isinstance(lane, ConnectorCbt):
                    lane.attach(base, p.mix_size)
            sources[0] = disks.allocated_bytes(image)
            for i in range(p.rounds + 1):
                if i > 0:
                    clusters = rounds[i - 1]
                    disks.apply_round(image, clusters)
                    for lane in order:
                        if isinstance(lane, ConnectorCbt):
                            for c in clusters:
                                lane.write(c.offset, c.data())
                    sources[i] = disks.allocated_bytes(image)
                    changed[i] = sum(c.length for c in clusters)
                for lane in order:
                    self.log(f"  rep {rep + 1}/{p.reps} round {i}: {lane.name}")
                    steps.setdefault((lane.name, i), []).append(lane.step(image))
            for lane in order:
                lane.end()
        for i in range(p.rounds + 1):
            scenario = f"full {_size(p.mix_size)} mixed" if i == 0 else f"incremental {i} (2%)"
            for lane in lanes:
                row = _row(scenario, lane, steps[(lane.name, i)], sources[i])
                row["changed_bytes"] = changed.get(i)
                self.rows.append(row)
        self.extra["mixed_disk"] = {
            "capacity": p.mix_size,
            "data_bytes": layout.data_bytes,
            "text_bytes": sum(n for _, n, k in layout.extents if k == disks.TEXT),
            "random_bytes": sum(n for _, n, k in layout.extents if k == disks.RANDOM),
            "rounds_changed_bytes": changed,
        }

    # ------------------------------------------------------- sparse against dense

    def sparse(self, services: Services) -> None:
        p = self.plan
        sparse, dense = self.work / "sparse.img", self.work / "dense.img"
        self.log(f"building the sparse disk ({_size(p.sparse_capacity)}, {_size(p.sparse_data)})")
        disks.make_sparse_pair(sparse, dense, p.sparse_capacity, p.sparse_data, seed=56)
        # rclone and boto3 would copy every byte of the capacity (holes as zeros).
        contenders = [c for c in self.contenders if c in ("connector (local transport)", "restic")]
        lanes = self.lanes(services, contenders)
        for label, image in (
            (f"sparse {_size(p.sparse_capacity)} ({_size(p.sparse_data)} data)", sparse),
            (f"dense {_size(p.sparse_data)} (same data)", dense),
        ):
            steps: dict[str, list[Step]] = {}
            # restic reads every byte of the capacity, holes as zeros: one target shows it.
            here = [ln for ln in lanes if not (ln.contender == "restic" and ln.target == S3)]
            if not here:
                continue
            for rep in range(p.reps):
                order = here[rep % len(here) :] + here[: rep % len(here)]
                for lane in order:
                    self.log(f"  rep {rep + 1}/{p.reps} {label}: {lane.name}")
                    lane.begin(rep, label.split()[0])
                    steps.setdefault(lane.name, []).append(lane.step(image))
                    lane.end()
            for lane in here:
                self.rows.append(_row(label, lane, steps[lane.name], disks.allocated_bytes(image)))

    # ------------------------------------------------------- four VMs at once

    def concurrency(self, services: Services) -> None:
        if "connector (local transport)" not in self.contenders:
            return
        p = self.plan
        images = []
        for i in range(p.concurrent_vms):
            path = self.work / f"vm{i}.img"
            disks.make_mix_image(path, p.concurrent_size, seed=100 + i)
            images.append(path)
        out: dict[str, Any] = {"vms": p.concurrent_vms, "disk_size": p.concurrent_size}
        servers: list[NbdServer] = []
        try:
            for mode in ("no added latency", f"{p.latency_ms} ms on every read"):
                disks_of: list[str]
                if mode.startswith("no"):
                    transport = "local"
                    disks_of = [f"path = {toml(img)}" for img in images]
                else:
                    transport = "nbd"
                    disks_of = []
                    for img in images:
                        srv = start_nbdkit(
                            img,
                            self.work / "nbd",
                            filters=["delay"],
                            filter_params=[f"rdelay={p.latency_ms}ms"],
                        )
                        servers.append(srv)
                        disks_of.append(f"nbd = {toml(srv.uri)}")
                seq_walls, con_walls, rss = [], [], []
                for rep in range(p.reps):
                    for how in ("one after another", "at once"):
                        self.log(f"  rep {rep + 1}/{p.reps} {p.concurrent_vms} VMs {how}, {mode}")
                        argvs, envs = [], []
                        root = self.work / "conc" / f"{transport}-{how[:3]}-{rep}"
                        shutil.rmtree(root, ignore_errors=True)
                        for i, disk in enumerate(disks_of):
                            wd = root / f"vm{i}"
                            wd.mkdir(parents=True)
                            cfg = wd / "connector.toml"
                            cfg.write_text(
                                f'[store]\nkind = "local"\npath = {toml(wd / "target")}\n'
                                f"[state]\npath = {toml(wd / 'state' / 'state.db')}\n"
                                f"[transport]\nkind = {toml(transport)}\n"
                                + local_vm_section(f"vm{i}", disk)
                            )
                            argvs.append(connector_argv("replicate", f"vm{i}", "--json"))
                            envs.append(base_env() | {"CONNECTOR_CONFIG": str(cfg)})
                        if how == "at once":
                            wall, ms = measure.run_together(argvs, envs, root / "logs")
                            con_walls.append(wall)
                        else:
                            start = time.monotonic()
                            ms = [
                                measure.run(a, e, root / "logs")
                                for a, e in zip(argvs, envs, strict=True)
                            ]
                            seq_walls.append(time.monotonic() - start)
                        for m in ms:
                            m.check()
                        rss.append(max(m.peak_rss_mib for m in ms))
                        shutil.rmtree(root, ignore_errors=True)
                seq, con = _median(seq_walls), _median(con_walls)
                out[mode] = {
                    "one_after_another_s": seq,
                    "at_once_s": con,
                    "speedup": seq / con if con else 0.0,
                    "peak_rss_mib_per_process": max(rss),
                    "repetitions": {"one_after_another_s": seq_walls, "at_once_s": con_walls},
                }
        finally:
            for srv in servers:
                srv.stop()
        self.extra["concurrency"] = out

    # ------------------------------------------------------- discovery at scale

    def discovery(self, ca: Any) -> None:
        p = self.plan
        self.log(f"starting the simulator with {2 * p.discovery_per_pool} VMs")
        start = time.monotonic()
        sim = start_simulator(
            self.work / "vcsim-large", ca, vms=p.discovery_per_pool, start_timeout=900
        )
        try:
            started = time.monotonic() - start
            wd = self.work / "discovery"
            wd.mkdir()
            cfg = wd / "connector.toml"
            cfg.write_text(
                f"[vcenter]\nurl = {toml(sim.url)}\nuser = {toml(sim.user)}\n"
                f"password_file = {toml(sim.password_file)}\nca_file = {toml(sim.ca_file)}\n"
                f'[store]\nkind = "local"\npath = {toml(wd / "target")}\n'
                f"[state]\npath = {toml(wd / 'state' / 'state.db')}\n"
            )
            env = base_env() | {"CONNECTOR_CONFIG": str(cfg)}
            runs = []
            for rep in range(p.reps):
                self.log(f"  rep {rep + 1}/{p.reps} connector vms")
                m = measure.run(connector_argv("vms", "--json"), env, wd / "logs").check()
                vms = json.loads(m.stdout)
                runs.append(
                    {
                        "wall_s": m.wall_s,
                        "cpu_s": m.cpu_s,
                        "peak_rss_mib": m.peak_rss_mib,
                        "vms": len(vms),
                        "disks": sum(len(v.get("disks", [])) for v in vms),
                    }
                )
        finally:
            sim.stop()
        self.extra["discovery"] = {
            "simulator_start_s": started,
            "repetitions": runs,
            "median": {k: _median([r[k] for r in runs]) for k in runs[0]},
        }

    # ------------------------------------------------------- the machine's limits

    def limits(self) -> None:
        self.log("measuring the machine's limits")
        image = self.work / "disk.img"
        self.extra["limits"] = {
            "read_image_to_null": measure.read_throughput(image),
            "kernels_1mib_blocks": measure.cpu_limits(self.plan.limit_seconds),
        }


def _size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


def _machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_end": load,
        "restic": _version(["restic", "version"]),
        "rclone": _version(["rclone", "version"]).splitlines()[0] if shutil.which("rclone") else "",
    }


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "not installed"


ALL_CONTENDERS = list(CONTENDERS)
ALL_TARGETS = [DIR, S3]
