"""The API of a running `connector run` process, against the simulator and moto_server:
schemathesis against the schema it serves, the token on every path of that schema,
/readyz following S3 and vCenter down and back, and job actions that the
`connector jobs` CLI sees (and the other way round)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.audit import read_records
from tests.harness.api_daemon import TOKEN, Api, MiB, start_api_daemon
from tests.harness.ca import TestCA as CA
from tests.harness.daemon import wait_for
from tests.harness.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def api(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, test_ca: CA) -> Iterator[Api]:
    running = start_api_daemon(tmp_path / "c", vcsim, moto, s3_bucket, test_ca)
    try:
        yield running
    finally:
        code = running.daemon.terminate()
        assert code == 0, running.daemon.log()
        assert TOKEN not in running.daemon.log()
        audit = running.env.workdir / "state" / "audit.jsonl"
        assert not audit.exists() or TOKEN not in audit.read_text()


def schema_paths(api: Api) -> dict[str, dict[str, Any]]:
    status, schema = api.call("GET", "/openapi.json")
    assert status == 200
    paths: dict[str, dict[str, Any]] = schema["paths"]
    return paths


def test_every_path_of_the_schema_refuses_requests_without_the_token(api: Api) -> None:
    paths = schema_paths(api)
    expected = {
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/status",
        "/v1/fleet",
        "/v1/servers",
        "/v1/servers/{server_id}",
        "/v1/runs",
        "/v1/runs/{run_id}",
        "/v1/runs/{run_id}/disks",
        "/v1/jobs",
        "/v1/jobs/{job}",
        "/v1/jobs/{job}/start",
        "/v1/jobs/{job}/pause",
        "/v1/jobs/{job}/resume",
        "/v1/jobs/{job}/runs",
    }
    assert set(paths) == expected
    for path, operations in paths.items():
        concrete = path.replace("{server_id}", "x").replace("{run_id}", "x").replace("{job}", "x")
        for method in operations:
            for token in (None, "wrong-" + TOKEN[6:], TOKEN + "0"):
                status, body = api.call(method.upper(), concrete, {}, token=token)
                assert status == 401, (method, path, token, body)
                assert "bearer token is required" in body["error"]
    assert api.call("GET", "/openapi.json", token=None)[0] == 401
    # a token put in a URL does not authenticate, and is scrubbed from the log
    assert api.call("GET", f"/v1/jobs?token={TOKEN}", token=None)[0] == 401
    wait_for("the refusal in the log", lambda: "api.unauthorized" in api.daemon.log())
    assert TOKEN not in api.daemon.log()
    # the refused requests changed nothing
    assert api.call("GET", "/v1/jobs")[1] == []


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    api: Api, tmp_path: Path
) -> None:
    # A job to act on, so that the job operations reach more than their 404s.
    status, job = api.call("POST", "/v1/jobs", {"vm": api.vm, "frequency_hours": 24})
    assert status == 201, job
    report = tmp_path / "junit.xml"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"{api.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--tls-verify",
            str(api.ca_file),
            "--checks",
            # every check but positive_data_acceptance, which takes a 400 for a
            # business rule (a seed time a year back, a job being deleted) as a fault
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "25",
            "--seed",
            "13",
            "--request-timeout",
            "30",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,  # its example database and reports stay out of the tree
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-8000:]
    assert report.is_file()
    # it did exercise the API: every operation of the schema was tested
    operations = sum(len(ops) for ops in schema_paths(api).values())
    assert f"Tested: {operations}" in output, output[-3000:]
    assert "Stateful" in output
    assert TOKEN not in api.daemon.log()


def test_a_connector_alone_answers_the_fleet_with_404_as_the_cli_refuses(api: Api) -> None:
    status, body = api.call("GET", "/v1/fleet")
    cli = api.env.cli("fleet", "status", "--json")
    assert status == 404, body
    assert body == {
        "error": "this connector is not in a fleet: add a [fleet] section with "
        "database_url (see docs/fleet.md)"
    }
    assert cli.returncode == 2 and body["error"] in cli.stderr.replace("\n", " ")


def test_job_actions_through_the_api_are_seen_by_the_cli_and_back(api: Api) -> None:
    env = api.env
    status, job = api.call(
        "POST",
        "/v1/jobs",
        {"vm": api.vm, "frequency_hours": 12, "description": "from the API"},
    )
    assert status == 201 and job["vm_name"] == api.vm, job
    assert job["on_demand"] == {"quota": 2, "used": 0, "left": 2}
    listed = env.cli_json("jobs", "list")
    assert [(j["id"], j["description"]) for j in listed] == [(job["id"], "from the API")]

    status, paused = api.call("POST", f"/v1/jobs/{job['id']}/pause")
    assert status == 200 and paused["paused"] is True
    assert env.cli_json("jobs", "show", job["id"])["paused"] is True
    resumed = env.cli_json("jobs", "resume", job["id"])
    assert resumed["paused"] is False
    assert api.call("GET", f"/v1/jobs/{job['id']}")[1]["paused"] is False

    status, changed = api.call("PATCH", f"/v1/jobs/{job['id']}", {"retention": 3})
    assert status == 200 and changed["retention"] == 3
    assert env.cli_json("jobs", "show", job["id"])["retention"] == 3

    status, started = api.call("POST", f"/v1/jobs/{job['id']}/start")
    assert status == 202 and started["job_id"] == job["id"], started
    run_id = started["run_id"]
    assert run_id in [r["id"] for r in env.cli_json("jobs", "show", job["id"])["runs"]]

    def completed() -> Any:
        runs = api.call("GET", f"/v1/jobs/{job['id']}/runs")[1]
        return [r for r in runs if r["id"] == run_id and r["state"] == "COMPLETED"]

    (done,) = wait_for("the on-demand run to complete", completed, timeout=180, every=0.5)
    status, disks = api.call("GET", f"/v1/runs/{run_id}/disks")
    assert status == 200 and len(disks) == 1 and disks[0]["capacity"] == 8 * MiB
    assert done["disks"] == disks
    # the quota is counted as the CLI counts it, and enforced the same way
    assert api.call("GET", f"/v1/jobs/{job['id']}")[1]["on_demand"]["left"] == 1
    second = env.cli_json("jobs", "start", job["id"])
    wait_for(
        "the second run to end",
        lambda: all(
            r["state"] not in ("PENDING", "ACTIVE")
            for r in api.call("GET", f"/v1/jobs/{job['id']}/runs")[1]
        ),
        timeout=180,
        every=0.5,
    )
    status, refused = api.call("POST", f"/v1/jobs/{job['id']}/start")
    assert status == 409 and "on-demand quota is used up (2 of 2" in refused["error"]
    cli = env.cli("jobs", "start", job["id"])
    assert cli.returncode == 2 and "on-demand quota is used up (2 of 2" in cli.stderr
    shown = env.cli("jobs", "show", job["id"], check=True).stdout
    assert "on-demand runs: 0 of 2 left" in shown
    assert second["run_id"] != run_id

    metrics = api.call("GET", "/metrics")[1]
    runs_lines = [line for line in metrics.splitlines() if line.startswith("connector_run")]
    completed_runs = [float(line.split()[-1]) for line in runs_lines if 'state="COMPLETED"' in line]
    # the two on-demand runs, and the scheduled one that a 12-hour job seeded now runs
    assert completed_runs and completed_runs[0] >= 2, runs_lines
    assert "connector_vm_replication_lag_seconds{" in metrics
    assert f'vm="{api.vm}"' in metrics
    assert "connector_run_bytes_uploaded " in metrics

    status, deleted = api.call("DELETE", f"/v1/jobs/{job['id']}")
    assert status == 200 and deleted["state"] == "DELETED"
    assert env.cli_json("jobs", "list") == []
    status, again = api.call("POST", f"/v1/jobs/{job['id']}/pause")
    assert status == 400 and "create a new job" in again["error"]

    # every action is in the audit log, with the API's client as the actor
    records = read_records(env.workdir / "state" / "audit.jsonl")
    by_api = [(r["action"], r["outcome"]) for r in records if r["actor"].startswith("api client")]
    assert by_api == [
        ("job.create", "success"),
        ("job.pause", "success"),
        ("job.update", "success"),
        ("job.start", "success"),
        ("job.start", "failure"),
        ("job.delete", "success"),
        ("job.pause", "failure"),
    ]
    by_cli = [r["action"] for r in records if r["action"].startswith("job.")]
    assert "job.resume" in by_cli and by_cli.count("job.start") == 4


def _check(api: Api, name: str) -> dict[str, Any] | None:
    status, doc = api.call("GET", "/readyz")
    checks = {c["name"]: c for c in doc["checks"]}
    return {"status": status, **checks[name]}


def test_readyz_follows_s3_and_vcenter_going_away_and_coming_back(
    tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str, test_ca: CA
) -> None:
    s3_proxy = TcpProxy("127.0.0.1", moto.port)
    vc_proxy = TcpProxy("127.0.0.1", vcsim.port)
    s3_proxy.up()
    vc_proxy.up()
    api = start_api_daemon(
        tmp_path / "c",
        vcsim,
        moto,
        s3_bucket,
        test_ca,
        vcenter={"url": f"https://127.0.0.1:{vc_proxy.port}/sdk"},
        s3={"endpoint_url": f"https://127.0.0.1:{s3_proxy.port}"},
    )
    try:
        status, doc = api.call("GET", "/readyz")
        assert status == 200 and doc["ready"] is True
        assert {c["name"] for c in doc["checks"]} == {"vcenter", "s3", "queue", "daemon"}
        assert all(c["ok"] for c in doc["checks"]), doc
        for proxy, name in ((s3_proxy, "s3"), (vc_proxy, "vcenter")):
            proxy.down()

            def is_down(name: str = name) -> dict[str, Any] | None:
                check = _check(api, name)
                return check if check is not None and not check["ok"] else None

            down = wait_for(f"/readyz to report {name} down", is_down, timeout=60, every=0.2)
            assert down["status"] == 503 and down["detail"], down
            assert TOKEN not in down["detail"]
            assert api.call("GET", "/healthz")[0] == 200  # the process is still alive
            proxy.up()
            wait_for(
                f"/readyz to report {name} back",
                lambda: api.call("GET", "/readyz")[0] == 200,
                timeout=60,
                every=0.2,
            )
    finally:
        code = api.daemon.terminate()
        s3_proxy.down()
        vc_proxy.down()
    assert code == 0, api.daemon.log()
