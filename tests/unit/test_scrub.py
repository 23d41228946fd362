"""The one secret scrubber (connector.logging.scrub) and who feeds it."""

from __future__ import annotations

from connector.adapters.s3 import S3ObjectStore
from connector.logging import scrub
from connector.secrets import Secret


def test_signed_url_signatures_and_credentials_are_removed() -> None:
    url = (
        "https://b.s3.eu-central-1.amazonaws.com/packs/ab?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20261201%2Feu-central-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20261201T000000Z&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE"
        "&X-Amz-Signature=0123456789abcdef"
    )
    text = scrub(f"GET {url} failed")
    for leaked in ("AKIAEXAMPLE", "FwoGZXIvYXdzEXAMPLE", "0123456789abcdef"):
        assert leaked not in text
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in text and "X-Amz-Date=20261201T000000Z" in text
    assert text.startswith(
        "GET https://b.s3.eu-central-1.amazonaws.com/packs/ab?"
    ) and text.endswith(" failed")
    legacy = scrub("https://b.s3.amazonaws.com/k?AWSAccessKeyId=AKIAOLD&Signature=c2lnbmF0dXJl")
    assert "AKIAOLD" not in legacy and "c2lnbmF0dXJl" not in legacy


def test_authorization_values_and_url_passwords_are_removed() -> None:
    header = (
        "Authorization: AWS4-HMAC-SHA256 Credential=AKIAHDR/20261201/eu/s3/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=feedface"
    )
    text = scrub(header)
    assert "AKIAHDR" not in text and "feedface" not in text and "SignedHeaders=host" in text
    proxy = scrub("via http://alice:pa55word@proxy.example:3128 to https://vc.example/sdk")
    assert "pa55word" not in proxy and "alice" not in proxy
    assert "proxy.example:3128" in proxy and "https://vc.example/sdk" in proxy
    # ordinary text is left alone
    assert scrub("mail ops@example.com; key=value") == "mail ops@example.com; key=value"


def test_the_s3_store_hands_its_keys_to_the_one_scrubber() -> None:
    secret = "s3-secret-" + "7" * 30
    key_id = "AKIASCRUBTEST0000001"
    S3ObjectStore(
        "staging-bucket",
        region="eu-central-1",
        endpoint_url="https://127.0.0.1:9",
        access_key_id=Secret(key_id),
        secret_access_key=Secret(secret),
    )
    text = scrub(f"server said: bad signature for {key_id} with {secret}")
    assert secret not in text and key_id not in text and text.count("**********") == 2
