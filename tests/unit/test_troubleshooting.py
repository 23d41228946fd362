"""docs/troubleshooting.md lists every error message the connector can raise.

Both directions of the guide's promise:
- listed (always checked, here): every `raise` of a ConnectorError (or subclass)
  in connector/, and every `raise ValueError` of the config's validators (their
  text is the config error's), has an entry in the guide whose template is the
  message's literal text with `{}` for each value; and every entry still has a
  raise site (no stale entries). Each entry says the cause and the fix.
- seen (checked at the end of a full run, tests/messages/plugin.py): every entry
  was made by at least one test.

A new error: add a `### `its message`` heading with **Cause** and **Fix** under
the guide's section of its module; the failure below prints the entry to paste.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.messages import catalog
from tests.messages.plugin import unseen

# Errors whose message never reaches a user: the code that raises them catches them.
INTERNAL = {
    "ChangeIdRefused": "the changes stage reads the disk in full and records the reason",
    "_Unauthorized": "the datastore reader logs in again and retries",
}

# Raise sites whose message is not written out there, by (module, expression): what
# they carry, and where the guide documents it.
DYNAMIC = {
    ("connector/adapters/datastore_reader.py", "describe_ssl_error(self._host, exc)"): (
        "the TLS failure's description: the entries of connector/tls.py"
    ),
    ("connector/adapters/vddk.py", "describe_ssl_error(host, exc)"): (
        "the TLS failure's description: the entries of connector/tls.py"
    ),
    ("connector/adapters/local.py", "str(exc)"): (
        "the operating system's read error, retried; the entry `{error} ({path})` after "
        "the last try"
    ),
    ("connector/adapters/nbd.py", "str(request.error)"): (
        "the NBD server's error for a read, retried; the NBD entries after the last try"
    ),
    ("connector/config.py", "str(exc)"): (
        "a ConfigError of a thumbprint, proxy URL or NBD URI, given back to pydantic: "
        "the entries of connector/tls.py, connector/network.py and connector/adapters/nbd.py"
    ),
    (
        "connector/cli/security.py",
        "str(exc)",
    ): "`connector check --only`: the entry `unknown check(s)`",
    (
        "connector/adapters/kms.py",
        "describe_ssl_error(f'the KMS endpoint {endpoint}', tls_error)",
    ): ("the guide's section TLS failures"),
    (
        "connector/adapters/s3.py",
        "describe_ssl_error(f'the S3 endpoint {host}', tls_error or exc)",
    ): ("the guide's section TLS failures"),
    ("connector/adapters/vsphere.py", "describe_ssl_error(self._host, exc)"): (
        "the guide's section TLS failures"
    ),
    ("connector/adapters/vsphere.py", "text"): (
        "a vSphere fault, `{what} failed: {fault}: {message}`: the guide's section "
        "Messages built from parts"
    ),
    ("connector/adapters/nbd.py", "text"): (
        "a read that failed after its retries: the guide's section Messages built from parts"
    ),
    ("connector/adapters/nbd.py", "error"): (
        "an NBD server's error reply (errno), retried, then the read failure above"
    ),
    ("connector/adapters/nbd.py", "error or errno_mod.EIO"): (
        "an NBD server's error reply (errno), retried, then the read failure above"
    ),
    ("connector/pipeline/restore.py", "_write_failure(target, device, exc, written, len(refs))"): (
        "a restore write that failed midway: the guide's section Messages built from parts"
    ),
    ("connector/domain/jobs.py", "_seed_range_message(_show(value), now)"): (
        "the entry `--seed {time} is ...` (the seed time's range)"
    ),
    ("connector/domain/jobs.py", "_seed_range_message(text.strip(), now)"): (
        "the entry `--seed {time} is ...` (the seed time's range)"
    ),
}

# ValueError texts outside the config that are user-facing (wrapped by a ConnectorError).
VALUE_ERROR_MODULES = {"connector/config.py"}
VALUE_ERROR_SITES = {("connector/check.py", "unknown check(s)")}


def value_error_sites() -> list[catalog.Site]:
    sites = []
    for path in sorted(catalog.PACKAGE.rglob("*.py")):
        rel = path.relative_to(catalog.ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name)
                and node.exc.func.id == "ValueError"
                and node.exc.args
            ):
                template = catalog.template_of(node.exc.args[0])
                expr = ast.unparse(node.exc.args[0])
                wanted = rel in VALUE_ERROR_MODULES or any(
                    rel == m and template and template.startswith(p) for m, p in VALUE_ERROR_SITES
                )
                if wanted:
                    sites.append(catalog.Site(rel, node.lineno, "ValueError", template, expr))
    return sites


def user_facing_sites() -> list[catalog.Site]:
    sites = [s for s in catalog.raise_sites() if s.error not in INTERNAL]
    return sites + value_error_sites()


def entry_for(site: catalog.Site) -> str:
    return (
        f"### `{site.template}`\n\n"
        f"**Cause:** (what makes {site.where()} raise it)\n"
        f"**Fix:** (what the user does about it)\n"
    )


def test_every_error_the_code_raises_is_in_the_guide() -> None:
    documented = {catalog.normalize(e.template) for e in catalog.documented()}
    sites = [s for s in user_facing_sites() if s.template is not None and s.template != ""]
    missing = [s for s in sites if catalog.normalize(s.template or "") not in documented]
    assert not missing, (
        f"{len(missing)} error messages are not in docs/troubleshooting.md; add an entry for "
        "each under the section of its module (placeholders may be renamed):\n\n"
        + "\n".join(f"<!-- {s.where()} -->\n{entry_for(s)}" for s in missing)
    )


def test_every_message_not_written_at_its_raise_site_is_accounted_for() -> None:
    dynamic = {(s.path, s.expression) for s in user_facing_sites() if s.template is None}
    unknown = sorted(dynamic - set(DYNAMIC))
    assert not unknown, (
        "these raise sites build their message elsewhere; write the message out at the "
        "raise site, or add the site to DYNAMIC in tests/unit/test_troubleshooting.py with "
        f"where the guide documents what it carries: {unknown}"
    )
    stale = sorted(set(DYNAMIC) - dynamic)
    assert not stale, f"DYNAMIC lists raise sites that are gone; remove them: {stale}"
    empty = [s.where() for s in user_facing_sites() if s.template == ""]
    assert not empty, f"these raise a user-facing error without a message: {empty}"


def test_every_entry_of_the_guide_has_a_raise_site_a_cause_and_a_fix() -> None:
    raised = {catalog.normalize(s.template) for s in user_facing_sites() if s.template}
    entries = catalog.documented()
    stale = [e for e in entries if catalog.normalize(e.template) not in raised]
    assert not stale, (
        "the guide lists messages no code raises any more; remove them:\n"
        + "\n".join(f"  docs/troubleshooting.md:{e.line}: {e.template}" for e in stale)
    )
    counts: dict[str, int] = {}
    for e in entries:
        counts[catalog.normalize(e.template)] = counts.get(catalog.normalize(e.template), 0) + 1
    twice = [t for t, n in counts.items() if n > 1]
    assert not twice, f"entries listed twice: {twice}"
    lines = catalog.GUIDE.read_text().splitlines()
    bare = []
    for i, e in enumerate(entries):
        end = entries[i + 1].line - 1 if i + 1 < len(entries) else len(lines)
        body = "\n".join(lines[e.line : end])
        body = body.split("\n## ")[0]
        if not re.search(r"\*\*Cause:\*\* \S", body) or not re.search(r"\*\*Fix:\*\* \S", body):
            bare.append(f"docs/troubleshooting.md:{e.line}: {e.template}")
    assert not bare, "entries without a **Cause:** or a **Fix:**:\n" + "\n".join(bare)


def test_the_seen_check_matches_messages_made_from_a_template(tmp_path: Path) -> None:
    # The seen direction's matcher: values stand in for placeholders, spaces may wrap.
    p = catalog.pattern("run {run} has no disk {disk} (its disks: {keys})")
    assert p.search("error: run r-1 has no disk 7 (its disks: 2000, 2001)")
    assert not p.search("run r-1 has disk 7")
    # and the session check finds the entries no recorded message matches
    (tmp_path / "1.jsonl").write_text('"nothing the guide lists"\n')
    assert unseen(tmp_path) == catalog.documented()
