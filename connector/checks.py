"""`connector check`: can this connector do its job with this config?

Each check is a function of the config that returns one or more results; a
check that does not apply to the config returns "skip". Add a check by
writing the function and listing it in CHECKS.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from connector.adapters.vddk import dump_vddk_plugin, nbdkit_plugin_dir, vddk_library
from connector.config import Config

Status = Literal["ok", "fail", "skip"]


@dataclass(frozen=True)
class CheckResult:
    check: str
    status: Status
    detail: str


Check = Callable[[Config], list[CheckResult]]


def check_vddk(config: Config) -> list[CheckResult]:
    """The vddk transport: nbdkit, its vddk plugin, and the VDDK library in libdir."""
    name = "vddk"
    vddk = config.transport.vddk
    if config.transport.kind != "vddk" or vddk is None:
        return [CheckResult(name, "skip", f"transport is {config.transport.kind!r}")]
    results: list[CheckResult] = []
    nbdkit = shutil.which(vddk.nbdkit)
    if nbdkit is None:
        return [
            CheckResult(
                f"{name}: nbdkit",
                "fail",
                f"{vddk.nbdkit!r} is not installed or not on PATH (apt-get install nbdkit)",
            )
        ]
    results.append(CheckResult(f"{name}: nbdkit", "ok", nbdkit))
    plugindir = nbdkit_plugin_dir(nbdkit)
    plugin = plugindir / "nbdkit-vddk-plugin.so" if plugindir is not None else None
    if plugin is None or not plugin.is_file():
        results.append(
            CheckResult(
                f"{name}: vddk plugin",
                "fail",
                f"nbdkit has no vddk plugin in {plugindir}: install nbdkit-plugin-vddk "
                "(Debian 13 contrib, Ubuntu universe) or nbdkit-vddk-plugin (RHEL, Fedora)",
            )
        )
    else:
        results.append(CheckResult(f"{name}: vddk plugin", "ok", str(plugin)))
    library = vddk_library(vddk.libdir)
    if library is None:
        where = "does not exist" if not vddk.libdir.exists() else "holds no lib64/libvixDiskLib.so*"
        results.append(
            CheckResult(
                f"{name}: VDDK library",
                "fail",
                f"VDDK is missing: {vddk.libdir} {where}. VDDK is VMware's proprietary Virtual "
                "Disk Development Kit and is not shipped with the connector: download it for "
                "Linux from VMware, unpack it there (or mount it there in the container), or "
                "point [transport.vddk] libdir at it",
            )
        )
    else:
        results.append(CheckResult(f"{name}: VDDK library", "ok", str(library)))
    if all(r.status == "ok" for r in results):
        ok, detail = dump_vddk_plugin(nbdkit, vddk.libdir)
        results.append(CheckResult(f"{name}: load", "ok" if ok else "fail", detail))
    return results


CHECKS: list[Check] = [check_vddk]


def run_checks(config: Config, checks: list[Check] | None = None) -> list[CheckResult]:
    results: list[CheckResult] = []
    for check in checks if checks is not None else CHECKS:
        results.extend(check(config))
    return results
