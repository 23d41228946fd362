"""The pytest side of the troubleshooting guide's check (docs/troubleshooting.md).

At the start of a session: a new folder under build/messages-seen/ and
`CONNECTOR_MESSAGES_SEEN` pointing at it, `PYTHONPATH` carrying the recorder
(tests/messages/site) into every child process, and the recorder installed in
this process. At the end, when `CONNECTOR_CHECK_MESSAGES=1` (set by .ci/run,
which runs the whole suite): every message the guide lists must have been made
by at least one test of this session, else the session fails with the list of
those that were not (also written to build/messages-unseen.txt). Entries listed in
tests/messages/not-yet-tested.txt are known gaps: tolerated while unseen, and
the check fails once one of them is made by a test, so that the list only
shrinks. A partial run
(`-k`, one file) does not set it, so the check never depends on what was selected.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.messages import catalog, record

CHECK_ENV = "CONNECTOR_CHECK_MESSAGES"
_SITE = Path(__file__).resolve().parent / "site"
GAPS = Path(__file__).resolve().parent / "not-yet-tested.txt"
_KEY = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    base = catalog.SEEN_DIR
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():  # sessions of more than a day ago
        if old.is_dir() and old.stat().st_mtime < time.time() - 86400:
            shutil.rmtree(old, ignore_errors=True)
    folder = base / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    folder.mkdir()
    config.stash[_KEY] = folder
    os.environ[record.ENV] = str(folder)
    paths = [str(_SITE), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    record.install(folder)


def unseen(folder: Path) -> list[catalog.Entry]:
    """The guide's entries that no message recorded in `folder` matches."""
    seen = catalog.seen_messages(folder)
    return [
        e
        for e in catalog.documented()
        if not any(catalog.pattern(e.template).search(m) for m in seen)
    ]


def known_gaps() -> set[str]:
    """Entries accepted, for now, as made by no test: tests/messages/not-yet-tested.txt,
    one template a line (lines from build/messages-unseen.txt, `#` comments)."""
    if not GAPS.exists():
        return set()
    prefix = re.compile(r"^docs/troubleshooting\.md:\d+: ")
    lines = (prefix.sub("", line).strip() for line in GAPS.read_text().splitlines())
    return {catalog.normalize(t) for t in lines if t and not t.startswith("#")}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get(CHECK_ENV) != "1":
        return
    folder = session.config.stash[_KEY]
    missing = unseen(folder)
    report = catalog.ROOT / "build" / "messages-unseen.txt"
    report.write_text("".join(f"docs/troubleshooting.md:{e.line}: {e.template}\n" for e in missing))
    gaps = known_gaps()
    new = [e for e in missing if catalog.normalize(e.template) not in gaps]
    unseen_now = {catalog.normalize(e.template) for e in missing}
    closed = sorted(gaps - unseen_now)
    lines = []
    if new:
        lines += [
            f"{len(new)} messages of docs/troubleshooting.md were made by no test "
            "(write a test that makes each, or remove an entry whose error is gone):",
            *(f"  docs/troubleshooting.md:{e.line}: {e.template}" for e in new),
            f"(all unseen entries are in {report})",
        ]
    if closed:
        lines += [
            f"{len(closed)} entries of {GAPS.relative_to(catalog.ROOT)} are made by a test now "
            "(or are no longer in the guide); remove them from that list:",
            *(f"  {t}" for t in closed),
        ]
    if lines:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
