"""Discovery: keeps the server catalog current by polling vCenter's inventory.

It runs on the scheduler's thread pool with its own vCenter session, so a slow
inventory never holds up a replication, and a failed poll is logged and tried
again at the next interval.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from connector.errors import ConnectorError
from connector.logging import get_logger, scrub
from connector.pipeline.discover import refresh_catalog
from connector.ports import Catalog, Hypervisor

log = get_logger(__name__)


class Discovery:
    def __init__(self, make_hv: Callable[[], Hypervisor], state: Catalog) -> None:
        self._make_hv = make_hv
        self._hv: Hypervisor | None = None
        self.state = state
        self._lock = threading.Lock()
        self.polls = 0
        self.last_error: str | None = None

    def poll(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # the previous poll is still running
        try:
            self._poll()
        except ConnectorError as exc:
            self.last_error = scrub(str(exc))
            log.warning("inventory poll failed; trying again later", error=self.last_error)
        except Exception as exc:
            self.last_error = scrub(f"{type(exc).__name__}: {exc}")
            log.error("inventory poll failed unexpectedly", error=self.last_error)
        finally:
            self._lock.release()

    def _poll(self) -> None:
        if self._hv is None:
            self._hv = self._make_hv()
        refresh_catalog(self._hv, self.state)
        self.polls += 1
        self.last_error = None

    def close(self) -> None:
        if self._hv is not None:
            self._hv.close()
