"""Outbound network settings: the corporate HTTPS proxy.

Every client of the connector (boto3 for S3/KMS/EC2/EBS/STS, pyVmomi for
vCenter, the datastore reader for ESXi) reaches its server either directly or
through one HTTP CONNECT proxy. Through the proxy, TLS still runs end to end
between the connector and the server, with the same TLS 1.2 floor and the same
certificate verification: the proxy only sees the host name and port.

A TLS-inspecting proxy re-issues server certificates from its own CA; give
that CA as `proxy_ca_file` and it is trusted, in addition to the usual trust,
for connections that go through the proxy (and only for those).
"""

from __future__ import annotations

import http.client
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from connector.errors import ConfigError


@dataclass(frozen=True)
class Proxy:
    """An HTTP CONNECT proxy and the hosts that bypass it."""

    host: str
    port: int
    ca_file: Path | None = None
    no_proxy: tuple[str, ...] = field(default=())

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def applies_to(self, host: str) -> bool:
        """True when connections to `host` go through this proxy (not matched by no_proxy)."""
        return not bypasses(host, self.no_proxy)


def parse_proxy_url(url: str, what: str = "https_proxy") -> tuple[str, int]:
    """(host, port) of an `http://host:port` proxy URL, or ConfigError.

    Credentials in the URL are refused (and never echoed); so is TLS to the
    proxy itself, which the connector's clients cannot all speak.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        raise ConfigError(f"{what} is not a valid URL; write it as http://host:port") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"{what} must not carry a user name or password; the connector supports proxies "
            "that need no authentication (allow the connector's address on the proxy)"
        )
    if parts.scheme == "https":
        raise ConfigError(
            f"{what}: TLS to the proxy itself is not supported; use the proxy's http:// "
            "CONNECT port (the connections inside the tunnel are TLS end to end, verified)"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{what} must look like http://proxy.example.com:3128")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{what} must be http://host:port with no path or query")
    return parts.hostname, port or 80


def make_proxy(
    url: str | None, no_proxy: Iterable[str] = (), ca_file: Path | None = None
) -> Proxy | None:
    """A Proxy from configuration values; None when no proxy is configured."""
    if not url:
        if ca_file is not None:
            raise ConfigError("proxy_ca_file is set but https_proxy is not")
        return None
    host, port = parse_proxy_url(url)
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(f"proxy_ca_file {ca_file} does not exist or is not a file")
    entries = tuple(e.strip().lower() for e in no_proxy if e.strip())
    return Proxy(host=host, port=port, ca_file=ca_file, no_proxy=entries)


def split_no_proxy(value: str) -> list[str]:
    """The entries of a comma-separated no_proxy value (as in the environment variable)."""
    return [e.strip() for e in value.split(",") if e.strip()]


def bypasses(host: str, no_proxy: Iterable[str]) -> bool:
    """Whether `host` matches a no_proxy entry.

    Entries: `*` (every host), a host name that matches itself and its
    subdomains (`example.com`, `.example.com`), an IP address, or a network
    in CIDR notation (`10.0.0.0/8`).
    """
    name = host.strip("[]").lower().rstrip(".")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
    except ValueError:
        address = None
    for raw in no_proxy:
        entry = raw.strip().lower().rstrip(".")
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        domain = entry.lstrip(".")
        if name == domain or name.endswith("." + domain):
            return True
    return False


def https_connection(
    host: str, port: int, context: ssl.SSLContext, timeout: float, proxy: Proxy | None
) -> http.client.HTTPSConnection:
    """An HTTPS connection to host:port, tunnelled through `proxy` when it applies.

    Through a tunnel, TLS is negotiated with the destination (SNI and host name
    check against `host`), never with the proxy.
    """
    if proxy is None or not proxy.applies_to(host):
        return http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    conn = http.client.HTTPSConnection(proxy.host, proxy.port, context=context, timeout=timeout)
    conn.set_tunnel(host, port)
    return conn
