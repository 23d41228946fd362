"""Stage `discover`: the inventory (VMs, disks, capacity, CBT state, snapshots,
power state) into the server catalog, keyed by VM instance UUID.

Not a stage of a run: the daemon runs it on a schedule (`daemon/discovery.py`)
and commands that name a VM run it when the catalog does not know the name.
"""

from __future__ import annotations

from connector.domain.records import ServerRow
from connector.logging import get_logger
from connector.ports import Catalog, Hypervisor

log = get_logger(__name__)


def refresh_catalog(hv: Hypervisor, catalog: Catalog) -> list[ServerRow]:
    """Every VM of the inventory into the catalog; VMs gone from it are marked removed.

    Logs what is new, changed (disks or CBT) and removed.
    """
    before = {s.vm_uuid: s for s in catalog.servers() if s.removed_at is None}
    vms = hv.list_vms()
    rows = []
    for vm in vms:
        known = before.get(vm.uuid)
        row = catalog.upsert_server(vm)
        rows.append(row)
        if known is None:
            log.info("new VM in the inventory", vm=vm.uuid, name=vm.name)
        elif (known.disks, known.cbt_enabled) != (row.disks, row.cbt_enabled):
            log.info("VM changed (disks or CBT)", vm=vm.uuid, name=vm.name)
    present = {vm.uuid for vm in vms}
    for uuid in set(before) - present:
        log.warning("VM removed from the inventory", vm=uuid, name=before[uuid].name)
    catalog.mark_removed(present)
    return rows
