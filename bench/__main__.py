"""`python -m bench run [--quick] [--out build/bench]`: see bench/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from bench.run import ALL_CONTENDERS, ALL_TARGETS, Bench, Plan

    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the disks, run every contender, write the reports")
    run.add_argument("--quick", action="store_true", help="tiny disks, 1 repetition (CI smoke)")
    run.add_argument(
        "--out",
        type=Path,
        default=REPO / "build" / "bench",
        help="where result.json, results.md and results.png go",
    )
    run.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch space for disks and targets (default: OUT/work)",
    )
    run.add_argument("--reps", type=int, default=None, help="repetitions (default 3; quick 1)")
    run.add_argument(
        "--rounds", type=int, default=None, help="incremental rounds (default 3; quick 1)"
    )
    run.add_argument(
        "--contender",
        action="append",
        choices=ALL_CONTENDERS,
        help="run only these contenders (repeatable; default all)",
    )
    run.add_argument(
        "--target",
        action="append",
        choices=ALL_TARGETS,
        help="run only these targets (repeatable; default both)",
    )
    run.add_argument(
        "--update-readme",
        action="store_true",
        help="also put results.md into bench/README.md (and the JSON and chart beside it)",
    )
    args = parser.parse_args(argv)
    plan = Plan.make(args.quick, args.reps)
    if args.rounds is not None:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    out: Path = args.out.resolve()
    bench = Bench(
        plan,
        out,
        (args.work or out / "work").resolve(),
        args.contender or ALL_CONTENDERS,
        args.target or ALL_TARGETS,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    result = bench.run()
    for t in result["targets"]:
        met = {True: "met", False: "MISSED", None: "not run"}[t["met"]]
        print(f"{met:8} {t['target']}: {t['measured']} (goal {t['goal']})")
    print(f"reports in {out}: result.json, results.md, results.png")
    if args.update_readme:
        from bench.report import update_readme

        update_readme(REPO / "bench" / "README.md", (out / "results.md").read_text())
        for name in ("result.json", "results.png"):  # what bench/README.md links to
            shutil.copyfile(out / name, REPO / "bench" / name)
        print("bench/README.md, bench/result.json and bench/results.png updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
