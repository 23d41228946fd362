"""`connector vms`: the server catalog, refreshed from vCenter."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

from connector.cli.common import ConfigOpt, JsonOpt, human_size, id_table, out, run_with_app

if TYPE_CHECKING:
    from connector.app import App


def vms(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Refresh and show the server catalog: the VMs vCenter has."""

    def go(a: App) -> None:
        rows = a.servers.refresh()
        if as_json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
            return
        t = id_table(
            "name", "instance uuid", "power", "CBT", "disks", "snapshots", ids={"instance uuid"}
        )
        for r in rows:
            disks = ", ".join(f"{d['key']}:{human_size(d['capacity'])}" for d in r.disks)
            t.add_row(
                r.name,
                r.vm_uuid,
                r.power_state,
                "on" if r.cbt_enabled else "off",
                disks,
                str(len(r.snapshots)),
            )
        out.print(t)

    run_with_app(config, go, state_from_store=True)
