"""Finding the VM a user names: by instance UUID, name or server id."""

from __future__ import annotations

from dataclasses import dataclass

from connector.domain.records import ServerRow
from connector.errors import ConfigError, NotFoundError
from connector.pipeline.discover import refresh_catalog
from connector.ports import Catalog, Hypervisor


@dataclass
class Servers:
    """The server catalog as users see it; refreshed from the inventory on demand."""

    catalog: Catalog
    hypervisor: Hypervisor

    def refresh(self) -> list[ServerRow]:
        """Poll the inventory into the catalog; the VMs found."""
        return refresh_catalog(self.hypervisor, self.catalog)

    def resolve(self, name_or_uuid: str, refresh: bool = True) -> ServerRow:
        """One VM by instance UUID, name or server id (refreshing the catalog first when
        it does not know the name and `refresh` is set)."""
        matches = self.catalog.find_servers(name_or_uuid)
        if not matches and refresh:
            self.refresh()
            matches = self.catalog.find_servers(name_or_uuid)
        if not matches:
            raise NotFoundError(
                f"no VM named or with instance UUID {name_or_uuid!r}; list them with "
                "`connector vms`"
            )
        if len(matches) > 1:
            uuids = ", ".join(m.vm_uuid for m in matches)
            raise ConfigError(
                f"{len(matches)} VMs are named {name_or_uuid!r} ({uuids}); use the instance UUID"
            )
        return matches[0]
