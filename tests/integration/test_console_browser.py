"""The web console in a real browser: Debian's chromium and chromedriver, driven by
Selenium, against `connector run` on the simulator and moto_server.

The browser trusts the API's certificate by its public key's SHA-256 (chromium's
--ignore-certificate-errors-spki-list, honoured with a --user-data-dir of our
own), not by switching verification off. A screenshot is kept under
build/artifacts/ for CI.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.harness.api_daemon import TOKEN, Api, start_api_daemon
from tests.harness.ca import TestCA as CA
from tests.harness.daemon import wait_for
from tests.harness.postgres import temp_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def spki_hash(cert_file: Path) -> str:
    """Base64 of the SHA-256 of the certificate's SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def api(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, test_ca: CA) -> Iterator[Api]:
    running = start_api_daemon(tmp_path / "c", vcsim, moto, s3_bucket, test_ca)
    try:
        yield running
    finally:
        code = running.daemon.terminate()
        assert code == 0, running.daemon.log()


def browser(tmp_path: Path, cert_file: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--ignore-certificate-errors-spki-list={spki_hash(cert_file)}",
    ):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    return webdriver.Chrome(options=options, service=service)


def test_the_console_shows_a_cli_job_with_its_runs_and_pauses_it(api: Api, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    env = api.env
    job = env.cli_json("jobs", "create", api.vm, "-f", "12", "-d", "console test")
    run = env.cli_json("jobs", "start", job["id"])
    driver = browser(tmp_path, api.cert_file)
    try:
        driver.get(f"{api.url}/")
        assert driver.title == "Replication connector"
        # the login form; nothing of the connector's state before the token is given
        form = wait_for("the login form", lambda: driver.find_element(By.ID, "login-form"))
        assert form.is_displayed()
        assert job["id"] not in driver.page_source
        driver.find_element(By.ID, "token").send_keys("wrong-token-" + "0" * 24)
        driver.find_element(By.ID, "login").click()
        wait_for(
            "the refusal of a wrong token",
            lambda: "refused" in driver.find_element(By.ID, "login-error").text,
            timeout=20,
        )
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "login").click()

        row = f'#jobs tr[data-job="{job["id"]}"]'
        wait_for(
            "the job in the console",
            lambda: driver.find_elements(By.CSS_SELECTOR, row),
            timeout=30,
        )
        assert api.vm in driver.find_element(By.CSS_SELECTOR, row).text
        wait_for(
            "the run in the console",
            lambda: driver.find_elements(By.CSS_SELECTOR, f'#runs tr[data-run="{run["run_id"]}"]'),
            timeout=30,
        )
        wait_for(
            "READY in the health section",
            lambda: driver.find_element(By.ID, "ready").text == "READY",
            timeout=30,
        )
        # a connector alone: the fleet panel says so, and how to make a fleet
        wait_for(
            "the fleet panel",
            lambda: driver.find_element(By.ID, "fleet-summary").text == "NOT IN A FLEET",
            timeout=30,
        )
        assert "[fleet] section" in driver.find_element(By.ID, "fleet-message").text
        assert not driver.find_element(By.ID, "fleet").is_displayed()
        # the token is nowhere in the page or its address
        assert TOKEN not in driver.page_source and TOKEN not in driver.current_url

        driver.find_element(
            By.CSS_SELECTOR, f'button[data-action="pause"][data-job="{job["id"]}"]'
        ).click()
        wait_for(
            "the job shown paused",
            lambda: (
                "(paused)"
                in driver.find_element(By.CSS_SELECTOR, f'{row} td[data-field="state"]').text
            ),
            timeout=30,
        )
        shown = env.cli_json("jobs", "show", job["id"])
        assert shown["paused"] is True
        assert run["run_id"] in [r["id"] for r in shown["runs"]]
        # a Resume button replaced Pause
        assert driver.find_elements(
            By.CSS_SELECTOR, f'button[data-action="resume"][data-job="{job["id"]}"]'
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = tmp_path / "console.png"
        assert driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        shutil.copy(shot, ARTIFACTS / "console.png")
    finally:
        driver.quit()


def test_the_console_shows_the_fleet_with_its_member(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, test_ca: CA
) -> None:
    from selenium.webdriver.common.by import By

    with temp_database() as url:
        fleet = f'\n[fleet]\ndatabase_url = "{url}"\nmember_id = "console-member"\n'
        api = start_api_daemon(tmp_path / "c", vcsim, moto, s3_bucket, test_ca, extra=fleet)
        driver = browser(tmp_path, api.cert_file)
        try:
            driver.get(f"{api.url}/")
            wait_for("the login form", lambda: driver.find_element(By.ID, "login-form"))
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.ID, "login").click()
            row = '#fleet tr[data-member="console-member"]'
            wait_for(
                "the member, the leader, in the fleet panel",
                lambda: (
                    driver.find_elements(By.CSS_SELECTOR, row)
                    and driver.find_element(By.CSS_SELECTOR, f'{row} td[data-field="leader"]').text
                    == "yes"
                ),
                timeout=30,
            )
            assert driver.find_element(By.ID, "fleet-summary").text == "1 of 1 alive"
            assert "leader: console-member" in driver.find_element(By.ID, "fleet-message").text
            text = driver.find_element(By.CSS_SELECTOR, row).text
            assert "ALIVE" in text and "transport:datastore-https" in text and "s ago" in text
            assert (
                driver.find_element(By.CSS_SELECTOR, f'{row} td[data-field="running"]').text == "-"
            )
            assert TOKEN not in driver.page_source and url not in driver.page_source
        finally:
            driver.quit()
            code = api.daemon.terminate()
        assert code == 0, api.daemon.log()
