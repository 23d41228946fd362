"""The connector's user-facing error messages: where the code raises them, where the
troubleshooting guide documents them, and which ones the tests produced.

- `raise_sites()` scans the source (AST) for every `E(...)` (raised there or
  later, or printed) where E is `ConnectorError` or one of its subclasses (those
  of `connector.errors` and any class in `connector/` that derives from one),
  and turns each message into a
  template: the literal text of a string or f-string, with `{}` where a value is
  formatted in. A message that is not written out at the raise site (a variable,
  a call) has no template; such sites are listed by expression in `DYNAMIC` of
  tests/unit/test_troubleshooting.py with where their texts are documented.
- `documented()` reads docs/troubleshooting.md: every `### ` heading that is one
  code span (in double backticks when the message holds a backtick) is an
  entry, whose text is the message template (placeholders may have any name:
  `{vm}`, `{path}`).
- `seen_messages()` reads what the test session recorded (tests/messages/record.py).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "connector"
GUIDE = ROOT / "docs" / "troubleshooting.md"
SEEN_DIR = ROOT / "build" / "messages-seen"
# In-memory doubles of the ports for unit tests; the `connector` command never uses them.
NOT_SHIPPED = {"connector/fakes.py", "connector/fakestate.py", "connector/fakelanding.py"}
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository, e.g. connector/config.py
    line: int
    error: str  # the class raised
    template: str | None  # None: the message is not written out here
    expression: str  # the message argument as written

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def normalize(template: str) -> str:
    """A template with every placeholder as `{}` and its spaces collapsed."""
    return " ".join(_PLACEHOLDER.sub("{}", template).split())


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel not in NOT_SHIPPED:
            yield rel, ast.parse(path.read_text(), filename=rel)


def error_classes(modules: Iterable[tuple[str, ast.Module]]) -> set[str]:
    """Names of ConnectorError and every class in the package derived from it."""
    known = {"ConnectorError"}
    bases: dict[str, set[str]] = {}
    for _rel, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                names = {_name(b) for b in node.bases}
                bases.setdefault(node.name, set()).update(n for n in names if n)
    grew = True
    while grew:
        grew = False
        for name, parents in bases.items():
            if name not in known and parents & known:
                known.add(name)
                grew = True
    return known


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def template_of(node: ast.expr) -> str | None:
    """The literal text of a message expression, `{}` for formatted values; None if
    the expression is not a string written out (a variable, a call)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.replace("{", "{{").replace("}", "}}")
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value).replace("{", "{{").replace("}", "}}"))
            else:
                parts.append("{" + ast.unparse(value.value) + "}")  # type: ignore[attr-defined]
        return "".join(parts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template_of(node.left), template_of(node.right)
        if left is None and right is None:
            return None
        return (left if left is not None else "{}") + (right if right is not None else "{}")
    return None


def raise_sites() -> list[Site]:
    modules = list(_modules())
    classes = error_classes(modules)
    sites = []
    for rel, tree in modules:
        for node in ast.walk(tree):
            # Every construction of an error, raised at once or later (or printed).
            if not isinstance(node, ast.Call):
                continue
            error = _name(node.func)
            if error not in classes:
                continue
            args = list(node.args) or [k.value for k in node.keywords if k.arg == "message"]
            if not args:
                sites.append(Site(rel, node.lineno, error, "", ""))
                continue
            sites.append(Site(rel, node.lineno, error, template_of(args[0]), ast.unparse(args[0])))
    return sites


@dataclass(frozen=True)
class Entry:
    template: str
    line: int


def documented(text: str | None = None) -> list[Entry]:
    """The entries of the guide: each `### `...`` heading's template."""
    text = GUIDE.read_text() if text is None else text
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        m = re.fullmatch(r"### (`+) ?(.+?) ?\1\s*", line)
        if m:
            entries.append(Entry(m[2].replace("{{", "{").replace("}}", "}"), number))
    return entries


def pattern(template: str) -> re.Pattern[str]:
    """A regular expression found in every message made from `template` (its fixed
    words in order, any text where a value goes; wrapped messages contain it)."""
    parts = _PLACEHOLDER.split(normalize(template))
    return re.compile(
        r"\s*"
        + r".+?".join(r"\s+".join(map(re.escape, p.split())) if p.strip() else "" for p in parts)
        + r"\s*",
        re.S,
    )


def seen_messages(directory: Path = SEEN_DIR) -> set[str]:
    seen: set[str] = set()
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                seen.add(json.loads(line))
            except ValueError:
                continue  # a line cut by a killed process
    return seen
