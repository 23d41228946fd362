"""Disk reader over vCenter's datastore HTTPS endpoint (`/folder/...`).

It reads a snapshot's frozen base `-flat.vmdk` with ranged GETs, authenticated
by the vCenter session cookie, over the same verified TLS context as the SOAP
client. No extra software is needed on either side.

That file holds the snapshot's point in time only when the snapshot is the
first and only one of the VM and the disk is a plain flat VMDK (no parent
backing, not RDM, not independent): the source refuses everything else with
UnsupportedSourceError rather than read the wrong data.
"""

from __future__ import annotations

import http.client
import re
import ssl
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from connector.domain.model import DiskInfo, Extent, SnapshotInfo, VmInfo
from connector.errors import (
    ConnectorError,
    NotFoundError,
    PermanentError,
    TLSTrustError,
    UnsupportedSourceError,
)
from connector.logging import get_logger
from connector.network import Proxy, https_connection
from connector.retry import Retryable
from connector.retry import RetryPolicy as RetryPolicy  # re-exported: its old home
from connector.tls import describe_ssl_error

log = get_logger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST = 8 * MiB

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class DatastoreSession(Protocol):
    """What the reader needs from the vSphere client (VSphereClient provides it)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def ssl_context(self) -> ssl.SSLContext: ...

    def session_cookie(self) -> str: ...

    def session_generation(self) -> int: ...

    def relogin(self, generation: int | None = None) -> None: ...

    def get_vm(self, uuid: str) -> VmInfo: ...

    def get_snapshot(self, uuid: str, snapshot_ref: str) -> SnapshotInfo: ...

    def disk_backing_chain(self, uuid: str, snapshot_ref: str, disk_key: int) -> list[str]: ...

    def datastore_url(self, vm: VmInfo, file_name: str) -> str: ...


# ----------------------------------------------------------------------- retry policy

# The policy lives in connector.retry, shared by every reader; these names stay
# importable from here.
_Retryable = Retryable


# ----------------------------------------------------------------------------- reader


class DatastoreHttpsReader:
    """Ranged GETs on one flat disk file; implements the `DiskReader` port.

    One connection per reader, kept alive between requests; a reader can be
    shared between threads (requests are serialized).
    """

    def __init__(
        self,
        session: DatastoreSession,
        url: str,
        size: int,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        retry: RetryPolicy,
        timeout: float = 120.0,
        description: str = "disk",
        proxy: Proxy | None = None,
    ) -> None:
        if max_request <= 0:
            raise ValueError("max_request must be positive")
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"not an https URL: {url}")
        self._session = session
        self._host = parts.hostname
        self._port = parts.port or 443
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._size = size
        self._max_request = max_request
        self._retry = retry
        self._timeout = timeout
        self._what = description
        self._proxy = proxy
        self._conn: http.client.HTTPSConnection | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.bytes_read = 0
        self.requests = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def max_request(self) -> int:
        return self._max_request

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, in GETs of at most `max_request` bytes."""
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        if offset + length > self._size:
            raise ValueError(
                f"read [{offset}, {offset + length}) beyond the end of {self._what} "
                f"({self._size} bytes)"
            )
        chunks: list[bytes] = []
        position, end = offset, offset + length
        with self._lock:
            if self._closed:
                raise ValueError("read on a closed reader")
            while position < end:
                count = min(self._max_request, end - position)
                chunks.append(self._get(position, count))
                position += count
        return b"".join(chunks)

    def allocated_extents(self) -> list[Extent] | None:
        """The datastore browser cannot tell which ranges are allocated."""
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()

    def __enter__(self) -> DatastoreHttpsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -------------------------------------------------------------- internals

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _with_session(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` under the retry policy; on HTTP 401 log in again once and retry."""
        relogged = False
        while True:
            generation = self._session.session_generation()
            try:
                return self._retry.call(fn, what)
            except _Unauthorized:
                if relogged:
                    raise PermanentError(
                        f"{what}: vCenter refused the session cookie right after a new login "
                        "(does the user have the Datastore.Browse privilege?)"
                    ) from None
                log.info("datastore.relogin", reason="HTTP 401", disk=self._what)
                self._session.relogin(generation)
                relogged = True

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = https_connection(
                self._host, self._port, self._session.ssl_context(), self._timeout, self._proxy
            )
        return self._conn

    def _request(self, first: int, last: int) -> tuple[int, str, str | None, bytes]:
        """One ranged GET: (status, reason, Content-Range, body).

        Raises _Unauthorized on 401, _Retryable on transport failures and 5xx.
        """
        headers = {
            "Range": f"bytes={first}-{last}",
            "Cookie": self._session.session_cookie(),
            "Accept-Encoding": "identity",
        }
        try:
            conn = self._connection()
            self.requests += 1
            conn.request("GET", self._target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except ssl.SSLError as exc:
            self._drop()
            raise TLSTrustError(describe_ssl_error(self._host, exc)) from exc
        except (OSError, http.client.HTTPException) as exc:
            # connection reset or refused, timeout, a truncated body (IncompleteRead)
            self._drop()
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc
        if resp.will_close:
            self._drop()
        if resp.status == 401:
            raise _Unauthorized()
        if resp.status >= 500 or resp.status == 429:
            raise _Retryable(f"HTTP {resp.status} {resp.reason}")
        return resp.status, resp.reason, resp.getheader("Content-Range"), body

    def _get(self, offset: int, length: int) -> bytes:
        last = offset + length - 1
        what = f"reading {self._what} [{offset}, {offset + length})"
        status, reason, content_range, body = self._with_session(
            lambda: self._request(offset, last), what
        )
        if status == 404:
            raise NotFoundError(f"{self._what} was not found on the datastore (HTTP 404)")
        if status == 416:
            raise PermanentError(
                f"short read of {self._what}: [{offset}, {offset + length}) is beyond the end "
                "of the file (HTTP 416)"
            )
        if status == 206:
            got = _CONTENT_RANGE.match(content_range or "")
            if got is None or int(got.group(1)) != offset:
                raise PermanentError(
                    f"reading {self._what}: the server answered a different range "
                    f"({content_range!r}) than asked ({offset}-{last})"
                )
        elif not (status == 200 and offset == 0 and len(body) == length):
            # (a 200 is accepted only from a server that ignores Range on a file of this size)
            raise PermanentError(
                f"reading {self._what}: unexpected HTTP {status} {reason} to a range request"
            )
        if len(body) != length:
            raise PermanentError(
                f"short read of {self._what}: asked {length} bytes at {offset}, got {len(body)}"
            )
        self.bytes_read += length
        return body

    def file_size(self) -> int | None:
        """The file's size from a one-byte ranged GET; None if the server does not say.

        NotFoundError when the file does not exist.
        """
        with self._lock:
            status, _reason, content_range, _body = self._with_session(
                lambda: self._request(0, 0), f"checking {self._what}"
            )
        if status == 404:
            raise NotFoundError(f"{self._what} was not found on the datastore (HTTP 404)")
        if status == 416:
            return 0
        got = _CONTENT_RANGE.match(content_range or "")
        if status == 206 and got is not None and got.group(3) != "*":
            return int(got.group(3))
        return None


class _Unauthorized(ConnectorError):
    """HTTP 401: the session cookie is no longer valid."""


# ----------------------------------------------------------------------------- source


def flat_file_name(descriptor: str) -> str:
    """ "[ds] vm/disk.vmdk" -> "[ds] vm/disk-flat.vmdk"."""
    if not descriptor.endswith(".vmdk"):
        raise ValueError(f"not a VMDK descriptor name: {descriptor!r}")
    return descriptor[: -len(".vmdk")] + "-flat.vmdk"


class DatastoreHttpsSource:
    """Opens datastore HTTPS readers on a snapshot's disks; implements `DiskSource`."""

    def __init__(
        self,
        session: DatastoreSession,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        retry: RetryPolicy,
        timeout: float = 120.0,
        proxy: Proxy | None = None,
    ) -> None:
        self._session = session
        self._max_request = max_request
        self._retry = retry
        self._timeout = timeout
        self._proxy = proxy

    def open(self, vm: VmInfo, snapshot: SnapshotInfo, disk: DiskInfo) -> DatastoreHttpsReader:
        who = f"VM {vm.name!r} ({vm.uuid})"

        def refuse(reason: str) -> UnsupportedSourceError:
            return UnsupportedSourceError(
                f"{who}, disk {disk.key} ({disk.label}): the datastore-https transport cannot "
                f"read it correctly: {reason}"
            )

        # The VM as it is now: the caller's copy may predate a snapshot someone else
        # took, or still list our previous snapshot that has been removed since.
        current = self._session.get_vm(vm.uuid)
        if not any(s.ref == snapshot.ref for s in current.snapshots):
            raise NotFoundError(f"{who} no longer has snapshot {snapshot.name!r} ({snapshot.ref})")
        others = {s.ref: s.name for s in current.snapshots if s.ref != snapshot.ref}
        if others:
            raise refuse(
                f"the VM has snapshots other than {snapshot.name!r} "
                f"({', '.join(sorted(others.values()))}), so the base -flat.vmdk is not this "
                "snapshot's point in time; delete or consolidate them, or use the nbd transport"
            )

        frozen = next((d for d in snapshot.disks if d.key == disk.key), None)
        if frozen is None:
            fetched = self._session.get_snapshot(vm.uuid, snapshot.ref)
            frozen = next((d for d in fetched.disks if d.key == disk.key), None)
        if frozen is None:
            raise NotFoundError(f"{who}: snapshot {snapshot.name!r} has no disk {disk.key}")
        if frozen.rdm or disk.rdm:
            raise refuse("it is a raw device mapping, which snapshots do not freeze")
        if frozen.independent or disk.independent:
            raise refuse("it is an independent disk, which snapshots do not cover")
        if frozen.backing != "flat":
            raise refuse(f"its backing is {frozen.backing}, not a flat VMDK")
        chain = self._session.disk_backing_chain(vm.uuid, snapshot.ref, disk.key)
        if len(chain) > 1:
            raise refuse(
                f"the snapshot's disk {chain[0]} has a parent ({chain[1]}): a linked clone or "
                "delta disk, whose flat file holds only part of the disk"
            )
        try:
            flat = flat_file_name(frozen.file_name)
        except ValueError:
            raise refuse(f"its file {frozen.file_name!r} is not a .vmdk descriptor") from None

        url = self._session.datastore_url(current, flat)
        reader = DatastoreHttpsReader(
            self._session,
            url,
            frozen.capacity,
            max_request=self._max_request,
            retry=self._retry,
            timeout=self._timeout,
            description=f"{flat} of {who}",
            proxy=self._proxy,
        )
        self._check_file(reader, refuse, flat, frozen.capacity)
        return reader

    def _check_file(
        self,
        reader: DatastoreHttpsReader,
        refuse: Callable[[str], UnsupportedSourceError],
        flat: str,
        capacity: int,
    ) -> None:
        """Refuse a flat file that is missing or smaller than the disk (vSAN, VVol...)."""
        try:
            size = reader.file_size()
        except NotFoundError:
            reader.close()
            raise refuse(
                f"{flat} is not visible through the datastore browser (a vSAN or VVol "
                "datastore has no -flat.vmdk file); use the nbd transport"
            ) from None
        except BaseException:
            reader.close()
            raise
        if size is not None and size < capacity:
            reader.close()
            raise refuse(f"{flat} holds {size} bytes, fewer than the disk's {capacity}")
