"""A key provider on AWS KMS: the store's master key is a KMS data key, kept only wrapped.

A new store asks KMS for a data key (GenerateDataKey, AES_256) under the
configured KMS key, with the encryption context {"store": <store id>}. The
plaintext data key becomes the store's master key and is never written
anywhere; the store's `config` object keeps only KMS's ciphertext blob and the
key's ARN. Opening the store sends that blob back to KMS (Decrypt) with the same
encryption context and the configured key id, so a blob moved to another store,
or a store opened with another key, fails instead of yielding a wrong key.

The client is built by `make_aws_client`: verified TLS 1.2 or later, explicit
trust, no endpoint taken from the environment.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
)

from connector.adapters.s3 import _find_cause, make_aws_client
from connector.errors import (
    AuthenticationError,
    ConfigError,
    ConnectorError,
    PermanentError,
    TLSTrustError,
    TransientError,
    UnreachableError,
)
from connector.logging import register_secret, scrub
from connector.network import Proxy
from connector.secrets import Secret
from connector.store.keys import KEY_CONTEXT_PREFIX, KEY_SIZE
from connector.tls import describe_ssl_error, is_connection_drop

_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
    }
)
_AUTH_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }
)


class KmsKeyProvider:
    """Wraps and unwraps a store's master key with an AWS KMS symmetric key."""

    kind = "kms"

    def __init__(
        self,
        key_id: str,
        *,
        region: str,
        endpoint_url: str | None = None,
        ca_file: Path | None = None,
        access_key_id: Secret | None = None,
        secret_access_key: Secret | None = None,
        use_fips_endpoint: bool = False,
        proxy: Proxy | None = None,
    ) -> None:
        if not key_id.strip():
            raise ConfigError("[store] kms_key_id is empty; give a KMS key id, ARN or alias")
        self.key_id = key_id
        for secret in (access_key_id, secret_access_key):
            if secret is not None:
                register_secret(secret)  # a server's message might echo one
        self._client = make_aws_client(
            "kms",
            region=region,
            endpoint_url=endpoint_url,
            ca_file=ca_file,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            use_fips_endpoint=use_fips_endpoint,
            proxy=proxy,
        )
        self.endpoint: str = self._client.meta.endpoint_url

    @property
    def client(self) -> Any:
        """The underlying boto3 client (for checks of its TLS settings)."""
        return self._client

    def close(self) -> None:
        self._client.close()

    # -- KeyProvider -------------------------------------------------------------

    def new_master(self, context: bytes) -> tuple[bytes, dict[str, Any]]:
        self._check_key_state(self.key_id)
        resp = self._call(
            "GenerateDataKey",
            self.key_id,
            KeyId=self.key_id,
            KeySpec="AES_256",
            EncryptionContext=_encryption_context(context),
        )
        master: bytes = resp["Plaintext"]
        if len(master) != KEY_SIZE:
            raise PermanentError(
                f"KMS returned a data key of {len(master)} bytes for key {self.key_id}, "
                f"not {KEY_SIZE}; use a symmetric encryption key"
            )
        return master, self._record(resp["KeyId"], resp["CiphertextBlob"])

    def wrap(self, master: bytes, context: bytes) -> dict[str, Any]:
        self._check_key_state(self.key_id)
        resp = self._call(
            "Encrypt",
            self.key_id,
            KeyId=self.key_id,
            Plaintext=master,
            EncryptionContext=_encryption_context(context),
        )
        return self._record(resp["KeyId"], resp["CiphertextBlob"])

    def unwrap(self, wrapped: dict[str, Any], context: bytes) -> bytes:
        provider = wrapped.get("provider")
        if provider != self.kind:
            raise PermanentError(
                f"this store's master key is protected by {provider!r} (a local key file), "
                "but the connector is configured with [store] kms_key_id; remove kms_key_id "
                "and set key_file to the store's key file"
            )
        stored = str(wrapped.get("key_id", "?"))
        self._check_key_state(self.key_id, stored)
        try:
            blob = base64.b64decode(wrapped["wrapped"], validate=True)
        except (KeyError, ValueError):
            raise PermanentError(
                "the store's config object holds no valid KMS ciphertext; it is damaged"
            ) from None
        try:
            resp = self._call(
                "Decrypt",
                self.key_id,
                CiphertextBlob=blob,
                KeyId=self.key_id,
                EncryptionContext=_encryption_context(context),
            )
        except _WrongKey:
            raise PermanentError(
                f"the KMS key {self.key_id} configured in [store] kms_key_id does not open "
                f"this store: its master key is wrapped by KMS key {stored}. Set kms_key_id "
                "to that key (and check that these credentials may use it)"
            ) from None
        except _BadCiphertext:
            raise PermanentError(
                f"KMS refused the store's wrapped master key (InvalidCiphertext) with key "
                f"{self.key_id}: the config object does not belong to this store or is "
                f"damaged, or the key is not the one that wrapped it ({stored})"
            ) from None
        master: bytes = resp["Plaintext"]
        if len(master) != KEY_SIZE:
            raise PermanentError(
                "KMS returned a master key of the wrong size; the store is damaged"
            )
        return master

    # -- helpers -----------------------------------------------------------------

    def probe(self) -> str:
        """Check that the key can be used now: its state, then one data key, thrown away.

        Returns the key's ARN; raises the connector's errors (unreachable, denied,
        disabled, deleted) with their messages.
        """
        self._check_key_state(self.key_id)
        resp = self._call("GenerateDataKey", self.key_id, KeyId=self.key_id, KeySpec="AES_256")
        return str(resp.get("KeyId", self.key_id))

    def _record(self, key_arn: str, blob: bytes) -> dict[str, Any]:
        return {
            "provider": self.kind,
            "key_id": key_arn,
            "wrapped": base64.b64encode(blob).decode(),
        }

    def _check_key_state(self, key_id: str, stored: str | None = None) -> None:
        """A clear error for a missing, disabled or deleted key, before using it.

        DescribeKey is only for the message: when the key policy does not allow
        it, the cryptographic call that follows decides.
        """
        try:
            resp = self._client.describe_key(KeyId=key_id)
        except ClientError as exc:
            code = _code(exc)
            if code in ("AccessDeniedException", "AccessDenied"):
                return
            raise self._map(exc, "DescribeKey", key_id, stored) from exc
        except BotoCoreError as exc:
            raise self._map(exc, "DescribeKey", key_id, stored) from exc
        meta = resp.get("KeyMetadata", {})
        state = meta.get("KeyState", "Enabled")
        arn = meta.get("Arn", key_id)
        if state == "Disabled":
            raise PermanentError(
                f"the KMS key {key_id} ({arn}) is disabled, so the store's master key cannot "
                "be used; enable it (aws kms enable-key)"
            )
        if state in ("PendingDeletion", "PendingReplicaDeletion"):
            raise PermanentError(
                f"the KMS key {key_id} ({arn}) is scheduled for deletion; cancel the deletion "
                "(aws kms cancel-key-deletion) and enable it, or the replicas are lost"
            )
        if state not in ("Enabled", "Updating"):
            raise PermanentError(f"the KMS key {key_id} ({arn}) is {state} and cannot be used")
        usage = meta.get("KeyUsage")
        if usage is not None and usage != "ENCRYPT_DECRYPT":
            raise PermanentError(
                f"the KMS key {key_id} is a {usage} key; the store needs a symmetric "
                "ENCRYPT_DECRYPT key"
            )

    def _call(self, operation: str, key_id: str, **args: Any) -> dict[str, Any]:
        method = {
            "GenerateDataKey": self._client.generate_data_key,
            "Encrypt": self._client.encrypt,
            "Decrypt": self._client.decrypt,
        }[operation]
        try:
            resp: dict[str, Any] = method(**args)
        except ClientError as exc:
            code = _code(exc)
            if operation == "Decrypt" and code in (
                "IncorrectKeyException",
                "AccessDeniedException",
            ):
                raise _WrongKey() from exc
            if operation == "Decrypt" and code == "InvalidCiphertextException":
                raise _BadCiphertext() from exc
            raise self._map(exc, operation, key_id, None) from exc
        except BotoCoreError as exc:
            raise self._map(exc, operation, key_id, None) from exc
        return resp

    def _map(
        self, exc: BaseException, operation: str, key_id: str, stored: str | None
    ) -> ConnectorError:
        error = _map_error(exc, operation, key_id, self.endpoint, stored)
        text = scrub(str(error))
        return type(error)(text) if text != str(error) else error


class _WrongKey(Exception):
    pass


class _BadCiphertext(Exception):
    pass


def _encryption_context(context: bytes) -> dict[str, str]:
    store_id = context.removeprefix(KEY_CONTEXT_PREFIX).decode("ascii")
    return {"store": store_id}


def _code(exc: ClientError) -> str:
    code: str = exc.response.get("Error", {}).get("Code", "") or ""
    return code


def _map_error(
    exc: BaseException, operation: str, key_id: str, endpoint: str, stored: str | None
) -> ConnectorError:
    if isinstance(exc, ClientError):
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message") or ""
        detail = f"{code}" + (f": {message}" if message else "")
        if code == "NotFoundException":
            also = f" (the store was created with {stored})" if stored else ""
            return PermanentError(
                f"the KMS key {key_id} does not exist in this account and region{also} "
                f"({detail}); check [store] kms_key_id and the region"
            )
        if code == "DisabledException":
            return PermanentError(
                f"the KMS key {key_id} is disabled ({detail}); enable it (aws kms enable-key)"
            )
        if code == "KMSInvalidStateException":
            return PermanentError(
                f"the KMS key {key_id} cannot be used in its current state ({detail}); a key "
                "pending deletion must have its deletion cancelled and be enabled again"
            )
        if code in ("AccessDeniedException", "AccessDenied"):
            return AuthenticationError(
                f"KMS refused {operation} with key {key_id} ({detail}); the key policy or the "
                f"IAM policy must allow kms:{operation} for these credentials"
            )
        if code in _AUTH_CODES:
            return AuthenticationError(
                f"KMS refused the credentials for {operation} ({detail}); check the access "
                "key id and secret"
            )
        if code in _TRANSIENT_CODES or "Throttl" in code:
            return TransientError(f"KMS {operation} failed, try again later ({detail})")
        return PermanentError(f"KMS {operation} with key {key_id} failed ({detail})")
    if isinstance(exc, BotoCoreError):
        tls_error = _find_cause(exc, ssl.SSLError)
        if tls_error is not None and is_connection_drop(tls_error):
            return TransientError(
                f"KMS {operation} at {endpoint}: the connection was dropped ({tls_error}); "
                "try again"
            )
        if tls_error is not None:
            return TLSTrustError(describe_ssl_error(f"the KMS endpoint {endpoint}", tls_error))
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ProxyConnectionError):
        return UnreachableError(
            f"cannot reach the KMS endpoint {endpoint} ({exc}); check [store] "
            "kms_endpoint_url, the region, DNS, the firewall and any HTTPS proxy"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return AuthenticationError(
            f"no usable AWS credentials for KMS {operation} ({exc}); give access_key_id and "
            "secret_access_key_file in [s3], or run with an instance or container role"
        )
    if isinstance(exc, HTTPClientError):
        return TransientError(f"KMS {operation} at {endpoint} was interrupted ({exc}); try again")
    return PermanentError(f"KMS {operation} at {endpoint} failed: {exc}")
