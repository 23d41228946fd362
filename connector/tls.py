"""TLS client contexts: TLS 1.2 as a floor, verification always on.

Trust comes from the system store, a CA file, or a pinned SHA-256 thumbprint
of the server's certificate (for a self-signed vCenter). There is no way to
turn verification off.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Sequence
from pathlib import Path

from connector.errors import ConfigError, TLSTrustError

_THUMB_RE = re.compile(r"^[0-9A-Fa-f]{2}(:?[0-9A-Fa-f]{2}){31}$")


def normalize_thumbprint(value: str) -> str:
    """Return a SHA-256 thumbprint as 64 lower-case hex digits, or raise ConfigError."""
    value = value.strip()
    if not _THUMB_RE.match(value):
        raise ConfigError(
            "thumbprint must be the SHA-256 fingerprint of the server certificate: "
            "32 hex bytes, with or without colons (openssl x509 -noout -fingerprint -sha256)"
        )
    return value.replace(":", "").lower()


def client_context(
    ca_file: Path | None = None, extra_ca_files: Sequence[Path] = ()
) -> ssl.SSLContext:
    """A verifying client context with TLS 1.2 minimum.

    With `ca_file`, only that CA bundle is trusted; otherwise the system store.
    `extra_ca_files` are trusted in addition (the CA of a TLS-inspecting proxy).
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if ca_file is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        load_ca_file(ctx, ca_file)
    for extra in extra_ca_files:
        load_ca_file(ctx, extra)
    return ctx


def load_ca_file(ctx: ssl.SSLContext, ca_file: Path) -> None:
    """Add the certificates of a PEM bundle to a context's trust, or raise ConfigError."""
    if not Path(ca_file).is_file():
        raise ConfigError(f"CA file {ca_file} does not exist or is not a file")
    try:
        ctx.load_verify_locations(cafile=str(ca_file))
    except ssl.SSLError as exc:
        raise ConfigError(f"CA file {ca_file} holds no usable PEM certificate: {exc}") from exc


# TLS 1.2 suites the connector's own HTTPS API offers: forward secrecy (ECDHE) and
# authenticated encryption (AES-GCM, ChaCha20-Poly1305) only. TLS 1.3 suites are
# all AEAD with forward secrecy, so OpenSSL's defaults stand for 1.3.
SERVER_CIPHERS_TLS12 = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
)


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 minimum, ECDHE + AEAD suites only, no compression or
    renegotiation, the server's cipher order."""
    for path, what in ((cert_file, "certificate"), (key_file, "private key")):
        if not Path(path).is_file():
            raise ConfigError(f"the API {what} file {path} does not exist or is not a file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(SERVER_CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        # An encrypted key gets an empty password (and fails) instead of a terminal prompt.
        ctx.load_cert_chain(str(cert_file), str(key_file), password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load the API certificate {cert_file} with its key {key_file}: {exc}"
        ) from None
    return ctx


def pinned_context(host: str, port: int, thumbprint: str, timeout: float = 10.0) -> ssl.SSLContext:
    """A verifying context whose only trust anchor is the pinned certificate.

    The server's certificate is fetched, its SHA-256 compared with the pin, and
    then that exact certificate becomes the sole trusted certificate of the
    returned context, so every later handshake is verified against it (host
    name included).
    """
    expected = normalize_thumbprint(thumbprint)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except OSError as exc:
        raise TLSTrustError(f"could not read the certificate of {host}:{port}: {exc}") from exc
    actual = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
    if actual != expected:
        raise TLSTrustError(
            f"the certificate of {host}:{port} does not match the pinned thumbprint "
            f"(the server presents {_colons(actual)}); check [vcenter] thumbprint"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=pem)
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def _colons(hexdigest: str) -> str:
    return ":".join(hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)).upper()


def is_connection_drop(exc: BaseException) -> bool:
    """Whether a TLS-layer error only says the connection went away (reset, closed
    without close_notify): a dropped connection, not a trust or protocol problem."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return False
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return True
    text = str(exc)
    return "EOF occurred in violation of protocol" in text or "UNEXPECTED_EOF" in text


def describe_ssl_error(host: str, exc: BaseException) -> str:
    """A user-facing sentence for a TLS failure against `host`."""
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
        if "match" in text or "mismatch" in text.lower():
            return (
                f"the certificate of {host} is not valid for that host name ({text}); "
                "connect with the name the certificate was issued for"
            )
        return (
            f"the certificate of {host} is not trusted ({text}); set ca_file to the CA that "
            "issued it, or pin its SHA-256 thumbprint"
        )
    if "UNSUPPORTED_PROTOCOL" in text or "protocol version" in text.lower():
        return f"{host} offers only TLS older than 1.2, which is refused ({text})"
    return f"TLS handshake with {host} failed: {text}"
