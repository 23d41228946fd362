"""KMS answers moto_server never gives (a key in a state other than Enabled, Disabled or
PendingDeletion; a data key of the wrong size), from a local HTTPS server that speaks
KMS's JSON protocol with a certificate of the test CA: the connector's real botocore
client reads them, and each gives the message the troubleshooting guide documents."""

from __future__ import annotations

import base64
import http.server
import json
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from connector.adapters.kms import KmsKeyProvider
from connector.errors import PermanentError
from connector.secrets import Secret
from connector.store.keys import KEY_CONTEXT_PREFIX

pytestmark = pytest.mark.integration

CONTEXT = KEY_CONTEXT_PREFIX + b"store-1"
ACCOUNT = "111122223333"
REGION = "eu-central-1"


def arn(key_id: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{key_id}"


# key id -> (KeyState, length of the data key GenerateDataKey returns)
KEYS = {
    "pending-import": ("PendingImport", 32),
    "unavailable": ("Unavailable", 32),
    "creating": ("Creating", 32),
    "short-data-key": ("Enabled", 16),
}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    calls: list[str] = []

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        action = self.headers["X-Amz-Target"].removeprefix("TrentService.")
        Handler.calls.append(action)
        key_id = body["KeyId"]
        state, size = KEYS[key_id]
        if action == "DescribeKey":
            answer: dict[str, Any] = {
                "KeyMetadata": {
                    "KeyId": key_id,
                    "Arn": arn(key_id),
                    "KeyState": state,
                    "KeyUsage": "ENCRYPT_DECRYPT",
                    "KeySpec": "SYMMETRIC_DEFAULT",
                    "Enabled": state == "Enabled",
                }
            }
        elif action == "GenerateDataKey":
            answer = {
                "KeyId": arn(key_id),
                "Plaintext": base64.b64encode(b"k" * size).decode(),
                "CiphertextBlob": base64.b64encode(b"wrapped:" + bytes(size)).decode(),
            }
        else:
            self.send_response(400)
            data = json.dumps({"__type": "UnsupportedOperationException"}).encode()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def kms_endpoint(test_ca: Any) -> Iterator[str]:
    cert = test_ca.issue("kms")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Handler.calls.clear()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def provider(endpoint: str, ca_file: Any, key_id: str) -> KmsKeyProvider:
    return KmsKeyProvider(
        key_id,
        region=REGION,
        endpoint_url=endpoint,
        ca_file=ca_file,
        access_key_id=Secret("AKIAEXAMPLEKMSTEST01"),
        secret_access_key=Secret("kms-test-secret-not-real-0123456789abcdef"),
    )


@pytest.mark.parametrize("key_id", ["pending-import", "unavailable", "creating"])
def test_a_key_in_a_state_that_cannot_serve_is_refused_naming_the_state(
    kms_endpoint: str, test_ca: Any, key_id: str
) -> None:
    keys = provider(kms_endpoint, test_ca.cert_file, key_id)
    try:
        with pytest.raises(PermanentError) as info:
            keys.new_master(CONTEXT)
    finally:
        keys.close()
    state = KEYS[key_id][0]
    assert str(info.value) == f"the KMS key {key_id} ({arn(key_id)}) is {state} and cannot be used"
    assert Handler.calls == ["DescribeKey"]  # refused before any data key was asked for


def test_a_data_key_of_the_wrong_size_is_refused_not_used(kms_endpoint: str, test_ca: Any) -> None:
    keys = provider(kms_endpoint, test_ca.cert_file, "short-data-key")
    try:
        with pytest.raises(PermanentError) as info:
            keys.new_master(CONTEXT)
    finally:
        keys.close()
    assert str(info.value) == (
        "KMS returned a data key of 16 bytes for key short-data-key, not 32; "
        "use a symmetric encryption key"
    )
    assert Handler.calls == ["DescribeKey", "GenerateDataKey"]
