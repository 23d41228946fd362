"""Store keys: a random master key per store, kept only wrapped by a key provider.

From the master key, HKDF derives the block-id key (keyed hash that names
blocks without revealing their content) and the data key (AES-256-GCM).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
from pathlib import Path
from typing import Any, Protocol

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from connector.errors import ConfigError, IntegrityError, PermanentError

NONCE_SIZE = 12
TAG_SIZE = 16  # AES-GCM's authentication tag
KEY_SIZE = 32
# The context a master key is wrapped under is this prefix followed by the store id.
KEY_CONTEXT_PREFIX = b"connector store master key:"


class KeyProvider(Protocol):
    """Wraps and unwraps a store's master key (local key file, AWS KMS)."""

    kind: str

    def new_master(self, context: bytes) -> tuple[bytes, dict[str, Any]]:
        """A new random master key and its wrapped record, for a new store."""
        ...

    def wrap(self, master: bytes, context: bytes) -> dict[str, Any]: ...

    def unwrap(self, wrapped: dict[str, Any], context: bytes) -> bytes:
        """Raise PermanentError with a clear message when this key cannot open it."""
        ...


class LocalKeyProvider:
    """A key-encryption key kept in a local file (base64 of 32 random bytes)."""

    kind = "local"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._kek = load_key_file(path)

    def new_master(self, context: bytes) -> tuple[bytes, dict[str, Any]]:
        master = os.urandom(KEY_SIZE)
        return master, self.wrap(master, context)

    @classmethod
    def from_text(cls, text: str, origin: str) -> LocalKeyProvider:
        """A provider whose key is given as base64 text (from the environment)."""
        provider = cls.__new__(cls)
        provider.path = Path(origin)
        provider._kek = parse_key(text, origin)
        return provider

    def wrap(self, master: bytes, context: bytes) -> dict[str, Any]:
        nonce = os.urandom(NONCE_SIZE)
        ct = AESGCM(self._kek).encrypt(nonce, master, context)
        return {"provider": self.kind, "wrapped": base64.b64encode(nonce + ct).decode()}

    def unwrap(self, wrapped: dict[str, Any], context: bytes) -> bytes:
        if wrapped.get("provider") != self.kind:
            raise PermanentError(
                f"this store's key is protected by {wrapped.get('provider')!r}, "
                "but the connector is configured with a local key file; configure that provider"
            )
        blob = base64.b64decode(wrapped["wrapped"])
        try:
            return AESGCM(self._kek).decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], context)
        except InvalidTag:
            raise PermanentError(
                f"the key file {self.path} does not open this store (wrong key); "
                "use the key file the store was created with"
            ) from None


def generate_key_file(path: Path) -> None:
    """Write a new random key file with mode 0600; refuse to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(os.urandom(KEY_SIZE)).decode() + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_key_file(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(
            f"the store key file {path} does not exist; without it the store cannot be read. "
            "Restore it from your backup, or create a new store with a new key"
        )
    return parse_key(path.read_text(), f"the store key file {path}")


def parse_key(text: str, origin: str) -> bytes:
    """32 key bytes from base64 text; ConfigError naming `origin` (never the text)."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ConfigError(f"{origin} is not base64 text") from None
    if len(key) != KEY_SIZE:
        raise ConfigError(f"{origin} must hold 32 bytes (base64), not {len(key)}")
    return key


class StoreKeys:
    """The derived keys of one store, and the blob seal/open operations."""

    def __init__(self, master: bytes) -> None:
        if len(master) != KEY_SIZE:
            raise ValueError("master key must be 32 bytes")
        self._id_key = _derive(master, b"connector block id v1")
        self._aead = AESGCM(_derive(master, b"connector data v1"))
        # zstd contexts are not thread-safe: one pair per thread (the daemon packs
        # several disks at once).
        self._local = threading.local()

    @property
    def _cctx(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=3)
        return cctx

    @property
    def _dctx(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def block_id(self, data: bytes) -> bytes:
        return hmac.digest(self._id_key, data, hashlib.sha256)

    def seal(self, plain: bytes, aad: bytes) -> bytes:
        """zstd-compress, then AES-256-GCM encrypt with a fresh nonce: nonce || ciphertext."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, self._cctx.compress(plain), aad)

    def open(self, blob: bytes, aad: bytes, what: str) -> bytes:
        """Authenticate, decrypt and decompress a sealed blob; IntegrityError names `what`."""
        try:
            if len(blob) < NONCE_SIZE + TAG_SIZE:  # cut short: not even a nonce and a tag
                raise InvalidTag
            compressed = self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication (damaged or altered)") from None
        try:
            return self._dctx.decompress(compressed)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what} does not decompress: {exc}") from exc

    def authenticate(self, blob: bytes, aad: bytes) -> bool:
        try:
            self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], aad)
        except InvalidTag:
            return False
        return True


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(master)
