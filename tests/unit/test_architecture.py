"""The architecture rules of pyproject.toml ([tool.importlinter]) hold, and they bite.

lint-imports runs as a process, as CI runs it; to show that each contract fails
when it is broken, it runs on a copy of the package with one offending import added.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import connector

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _contracts() -> dict[str, dict[str, object]]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in doc["tool"]["importlinter"]["contracts"]}


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(tree / "pyproject.toml")],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_pure_domain_contract_names_every_other_top_level_module() -> None:
    forbidden = set(_contracts()["pure-domain"]["forbidden_modules"])  # type: ignore[call-overload]
    top = {f"connector.{m.name}" for m in pkgutil.iter_modules(connector.__path__)}
    missing = top - forbidden - {"connector.domain", "connector.errors", "connector.__main__"}
    assert missing == set(), f"add {sorted(missing)} to the pure-domain contract"


def test_the_tree_keeps_every_contract() -> None:
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize(
    ("contract", "module", "offending"),
    [
        ("pure-domain", "domain/merkle.py", "import connector.adapters.state"),
        ("pure-domain", "domain/extents.py", "import boto3"),
        ("pipeline-over-ports", "pipeline/changes.py", "import connector.adapters.state"),
        ("pipeline-over-ports", "pipeline/commit.py", "import sqlalchemy"),
        ("no-cycles", "ports.py", "import connector.pipeline.driver"),
    ],
)
def test_a_broken_contract_fails_lint_imports(
    tmp_path: Path, contract: str, module: str, offending: str
) -> None:
    shutil.copytree(ROOT / "connector", tmp_path / "connector")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "connector" / module
    path.write_text(path.read_text() + f"\n{offending}  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode == 1, proc.stdout
    name = str(_contracts()[contract]["name"])
    squeezed = "".join(proc.stdout.split())  # the report pads or joins names and verdicts
    assert "".join(name.split()) + "BROKEN" in squeezed, proc.stdout


def test_each_stage_body_is_the_run_function_of_the_module_named_after_it() -> None:
    from connector.pipeline.driver import STAGES

    assert [s.name for s in STAGES] == [
        "validate",
        "snapshot",
        "changes",
        "transfer",
        "commit",
        "land",
        "cleanup",
    ]
    for stage in STAGES:
        assert stage.run.__module__ == f"connector.pipeline.{stage.name}", stage
        assert stage.run.__name__ == "run"


def test_no_stage_is_dispatched_by_building_a_method_name() -> None:
    proc = subprocess.run(
        ["grep", "-rn", 'getattr(self, f"_', str(ROOT / "connector")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
