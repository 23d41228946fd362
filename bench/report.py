"""The bench's outputs: result.json, results.md (tables, targets met or missed) and
results.png (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
CONNECTOR = "connector (local transport)"
CBT = "connector (vCenter sim, CBT)"


def _find(result: dict[str, Any], scenario_start: str, contender: str, target: str) -> Any:
    for row in result["results"]:
        if (
            row["scenario"].startswith(scenario_start)
            and row["contender"] == contender
            and row["target"] == target
        ):
            return row["median"]
    return None


def _target(name: str, goal: str, value: str, met: bool | None) -> dict[str, Any]:
    return {"target": name, "goal": goal, "measured": value, "met": met}


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each met, missed, or None when its lanes did not run."""
    out = []
    c, r = _find(result, "full", CONNECTOR, "dir"), _find(result, "full", "restic", "dir")
    if c and r:
        ratio = c["source_mib_s"] / r["source_mib_s"]
        out.append(
            _target(
                "full run to a local directory",
                ">= 2x restic's throughput",
                f"{ratio:.2f}x restic",
                ratio >= 2,
            )
        )
    c, b = _find(result, "full", CONNECTOR, "s3"), _find(result, "full", "boto3 upload_file", "s3")
    r = _find(result, "full", "restic", "s3")
    if c and b and r:
        out.append(
            _target(
                "full run to moto_server over TLS",
                "at least as fast as boto3 upload_file, faster than restic",
                f"{c['wall_s']:.1f} s; boto3 {b['wall_s']:.1f} s, restic {r['wall_s']:.1f} s",
                c["wall_s"] <= b["wall_s"] and c["wall_s"] < r["wall_s"],
            )
        )
    for target in ("s3", "dir"):
        incs = [row for row in result["results"] if row["scenario"].startswith("incremental")]
        pairs = []
        for row in incs:
            if row["contender"] == CBT and row["target"] == target:
                rest = _find(result, row["scenario"], "restic", target)
                if rest:
                    pairs.append((row, rest))
        if pairs:
            ratios = [rest["wall_s"] / row["median"]["wall_s"] for row, rest in pairs]
            reads = [row["median"]["bytes_read"] / row["changed_bytes"] for row, _ in pairs]
            where = "moto_server" if target == "s3" else "a local directory"
            out.append(
                _target(
                    f"incremental with CBT (2% changed) to {where}",
                    ">= 10x faster than restic's incremental",
                    f"{min(ratios):.1f}x-{max(ratios):.1f}x",
                    min(ratios) >= 10,
                )
            )
            out.append(
                _target(
                    f"incremental with CBT to {where}: bytes read",
                    "<= 1.1x the changed bytes",
                    f"{max(reads):.3f}x",
                    max(reads) <= 1.1,
                )
            )
    rss = [
        row["median"]["peak_rss_mib"]
        for row in result["results"]
        if row["contender"] in (CONNECTOR, CBT)
        and (row["scenario"].startswith("full") or row["scenario"].startswith("sparse"))
    ]
    if rss:
        out.append(
            _target(
                "peak RSS, mixed and sparse disks, every connector lane",
                "< 300 MiB",
                f"{max(rss):.0f} MiB",
                max(rss) < 300,
            )
        )
    for target in ("dir", "s3"):
        s = _find(result, "sparse", CONNECTOR, target)
        d = _find(result, "dense", CONNECTOR, target)
        if s and d:
            ratio = s["wall_s"] / d["wall_s"]
            out.append(
                _target(
                    f"sparse disk against the dense one holding its data ({target})",
                    "within 2x",
                    f"{ratio:.2f}x",
                    ratio <= 2,
                )
            )
    conc = result.get("concurrency") or {}
    for mode, stats in conc.items():
        if not isinstance(stats, dict):
            continue
        goal, need = ("no slower than one after another", 1.0)
        if not mode.startswith("no"):
            goal, need = ("at least 2x faster than one after another", 2.0)
        out.append(
            _target(
                f"{conc['vms']} VMs at once, {mode}",
                goal,
                f"{stats['speedup']:.2f}x",
                stats["speedup"] >= need,
            )
        )
    disc = result.get("discovery")
    if disc:
        m = disc["median"]
        out.append(
            _target(
                f"discovery of {m['vms']:.0f} VMs ({m['disks']:.0f} disks)",
                "< 30 s and < 300 MiB",
                f"{m['wall_s']:.1f} s, {m['peak_rss_mib']:.0f} MiB",
                m["wall_s"] < 30 and m["peak_rss_mib"] < 300,
            )
        )
    return out


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f}"


def markdown(result: dict[str, Any]) -> str:
    plan = result["plan"]
    lines = [
        f"# Bench results ({'quick' if plan['quick'] else 'full'}, {result['when']})",
        "",
        *(
            []
            if result.get("complete", True)
            else ["**Partial**: the run has not finished; later sections are missing.", ""]
        ),
        f"Machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}; "
        f"load average at the end {', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_end'])}. "  # noqa: E501
        f"Medians of {plan['reps']} repetition(s), interleaved. Source MiB/s is the data the "
        "image holds (holes excluded, the same for every contender) over the wall time.",
        "",
        "| scenario | contender -> target | wall s | source MiB/s | read MiB | uploaded MiB "
        "| CPU s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        m = row["median"]
        lines.append(
            f"| {row['scenario']} | {row['lane']} | {m['wall_s']:.2f} | {m['source_mib_s']:.1f} "
            f"| {_mib(m['bytes_read'])} | {_mib(m['bytes_uploaded'])} | {m['cpu_s']:.2f} "
            f"| {m['peak_rss_mib']:.0f} |"
        )
    conc = result.get("concurrency")
    if conc:
        lines += [
            "",
            f"## {conc['vms']} VMs of {_mib(conc['disk_size'])} MiB each "
            "(connector, local directory)",
            "",
            "| source reads | one after another s | at once s | speedup | peak RSS MiB |",
            "|---|---:|---:|---:|---:|",
        ]
        for mode, s in conc.items():
            if isinstance(s, dict):
                lines.append(
                    f"| {mode} | {s['one_after_another_s']:.2f} | {s['at_once_s']:.2f} "
                    f"| {s['speedup']:.2f}x | {s['peak_rss_mib_per_process']:.0f} |"
                )
    disc = result.get("discovery")
    if disc:
        m = disc["median"]
        lines += [
            "",
            "## Discovery (`connector vms` against the simulator)",
            "",
            "| VMs | disks | wall s | CPU s | peak RSS MiB |",
            "|---:|---:|---:|---:|---:|",
            f"| {m['vms']:.0f} | {m['disks']:.0f} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} "
            f"| {m['peak_rss_mib']:.0f} |",
        ]
    lim = result.get("limits")
    if lim:
        read = lim["read_image_to_null"]
        lines += [
            "",
            "## The machine's limits",
            "",
            f"Reading the mixed image to nowhere: {read['mib_s']:.0f} MiB/s "
            "(page cache warm: the image was just written and read).",
            "",
            "| kernel (1 MiB blocks) | one core MiB/s | all cores MiB/s |",
            "|---|---:|---:|",
        ]
        for name, k in lim["kernels_1mib_blocks"].items():
            lines.append(f"| {name} | {k['per_core_mib_s']:.0f} | {k['all_cores_mib_s']:.0f} |")
    if result.get("targets"):
        lines += ["", "## Targets", "", "| target | goal | measured | |", "|---|---|---|---|"]
        for t in result["targets"]:
            met = {True: "met", False: "**missed**", None: "not run"}[t["met"]]
            lines.append(f"| {t['target']} | {t['goal']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in result["results"]))
    lanes = list(dict.fromkeys(r["lane"] for r in result["results"]))
    fig, ax = plt.subplots(figsize=(12, 6))
    width = 0.8 / max(1, len(lanes))
    for i, lane in enumerate(lanes):
        xs, ys = [], []
        for j, scenario in enumerate(scenarios):
            for row in result["results"]:
                if row["lane"] == lane and row["scenario"] == scenario:
                    xs.append(j + i * width)
                    ys.append(row["median"]["wall_s"])
        ax.bar(xs, ys, width, label=lane)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scenarios))])
    ax.set_xticklabels(scenarios, rotation=15, ha="right")
    ax.set_ylabel("wall time, s (median; lower is better)")
    ax.set_yscale("log")
    ax.set_title("connector, restic, rclone and boto3 on the same disks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result))
    chart(result, out / "results.png")


START, END = "<!-- results:start -->", "<!-- results:end -->"


def update_readme(readme: Path, results_md: str) -> None:
    """Replace what lies between the results markers of `readme` with `results_md`
    (its title becomes a third-level heading)."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    body = results_md.replace("\n## ", "\n#### ").replace("# Bench results", "### Bench results", 1)
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    readme.write_text(f"{head}{START}\n{body}{END}{tail}")
