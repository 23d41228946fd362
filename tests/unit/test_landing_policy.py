"""The landing IAM policy is exactly what the landing adapter calls, and the docs say so."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from connector.adapters.ebs import ACTIONS
from connector.policies import LANDING_EBS_ACTIONS, LANDING_EC2_ACTIONS, iam_policy

ROOT = Path(__file__).resolve().parents[2]


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def _called() -> set[str]:
    """Every boto3 operation connector/adapters/ebs.py calls, as an IAM action."""
    tree = ast.parse((ROOT / "connector/adapters/ebs.py").read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        if node.func.attr == "close":  # closing a client is no AWS call
            continue
        owner = node.func.value
        if isinstance(owner, ast.Attribute) and owner.attr in ("ebs", "ec2"):
            out.add(f"{owner.attr}:{_camel(node.func.attr)}")
        elif isinstance(owner, ast.Name) and owner.id == "sts":
            out.add(f"sts:{_camel(node.func.attr)}")
    return out


def test_the_policy_holds_exactly_the_calls_of_the_adapter() -> None:
    called = _called()
    # Tags come with StartSnapshot and RegisterImage; EC2 authorizes them as CreateTags.
    expected = {a for a in called if not a.startswith("sts:")} | {"ec2:CreateTags"}
    policy = iam_policy("b-1-2", "p", "eu-central-1", landing=True)
    granted = {
        a for s in policy["Statement"] for a in s["Action"] if a.split(":")[0] in ("ebs", "ec2")
    }
    assert granted == expected
    assert set(LANDING_EBS_ACTIONS) | set(LANDING_EC2_ACTIONS) == expected
    # The adapter's error messages name the action of each call.
    assert {v for k, v in ACTIONS.items() if not v.startswith("sts:")} == expected
    assert "sts:AssumeRole" in called


def test_a_role_and_a_kms_key_add_their_statements() -> None:
    key = "arn:aws:kms:eu-central-1:123456789012:key/k"
    policy = iam_policy(
        "b-1-2",
        "p",
        "eu-central-1",
        landing=True,
        landing_kms_key_arn=key,
        landing_role_arn="arn:aws:iam::*:role/land",
    )
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert by_sid["LandingKmsKey"]["Resource"] == key
    assert by_sid["LandingAssumeRole"]["Action"] == ["sts:AssumeRole"]
    assert "Landing" not in json.dumps(iam_policy("b-1-2", "p", "eu-central-1"))


def test_the_permissions_doc_lists_the_same_actions() -> None:
    text = (ROOT / "docs/permissions.md").read_text()
    section = text.split("### Landing stage", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r'"((?:ebs|ec2):[A-Za-z]+)"', section))
    assert listed == set(LANDING_EBS_ACTIONS) | set(LANDING_EC2_ACTIONS)
