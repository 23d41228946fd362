"""Run testssl.sh (Debian package `testssl.sh`) against a local TLS endpoint and
judge its JSON findings: protocols below TLS 1.2 and weak cipher categories."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

# Protocols that must not be offered.
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLS1", "TLS1_1")
# Cipher categories that must not be offered: no encryption, no authentication,
# export grade, 64-bit/DES/RC4, 3DES/IDEA, and the obsolete CBC ciphers.
WEAK_CIPHER_LISTS = (
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",
)
BAD_SEVERITIES = ("MEDIUM", "HIGH", "CRITICAL")


def testssl_binary() -> str:
    exe = shutil.which("testssl") or shutil.which("testssl.sh")
    if exe is None:
        raise RuntimeError("testssl.sh is not installed: apt-get install -y testssl.sh")
    return exe


def run_testssl(
    port: int,
    workdir: Path,
    checks: tuple[str, ...] = ("-p", "-s"),
    timeout: float = 180,
) -> list[dict[str, Any]]:
    """By default the protocols (-p) and cipher categories (-s) of 127.0.0.1:port."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"testssl-{port}.json"
    out.unlink(missing_ok=True)
    subprocess.run(
        [
            testssl_binary(),
            *checks,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--jsonfile",
            str(out),
            f"127.0.0.1:{port}",
        ],
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=workdir,
    )
    if not out.is_file():
        raise RuntimeError(f"testssl.sh wrote no findings for 127.0.0.1:{port}")
    findings: list[dict[str, Any]] = json.loads(out.read_text())
    return findings


def weak_findings(findings: list[dict[str, Any]]) -> list[str]:
    """Findings that show an old protocol or a weak cipher category on offer."""
    by_id = {f["id"]: f for f in findings}
    problems: list[str] = []
    for ident in OLD_PROTOCOLS + WEAK_CIPHER_LISTS:
        finding = by_id.get(ident)
        if finding is None:
            problems.append(f"{ident}: not reported by testssl.sh")
        elif not str(finding["finding"]).startswith("not offered"):
            problems.append(f"{ident}: {finding['finding']} ({finding['severity']})")
    for finding in findings:
        ident = str(finding["id"])
        if ident.startswith(("cipher", "PFS", "TLS1_2", "TLS1_3")) and (
            finding["severity"] in BAD_SEVERITIES
        ):
            problems.append(f"{ident}: {finding['finding']} ({finding['severity']})")
    return problems
