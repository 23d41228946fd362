"""Fleet mode: several `connector run` processes sharing one PostgreSQL (a database of
the test's own) for their state and their job queue, one bucket and one store key.

- Three connectors and twelve VMs with jobs: every VM replicates and restores
  byte-exact; the stage log shows that no VM was ever worked on by two connectors
  at once, and that all three did work; one schedule slot makes one run.
- One connector killed with SIGKILL in the middle of a multipart upload: another
  completes its run within the lease timeout plus a margin, no VM snapshot and no
  multipart upload is left behind, and the restore is exact.
- The API of each member serves the fleet's status at /v1/fleet, the document of
  `connector fleet status --json`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import random
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connector.adapters.sql import Database, runs, stage_log
from connector.store.keys import generate_key_file
from tests.harness.api_daemon import TOKEN, Api, api_section
from tests.harness.ca import TestCA as CA
from tests.harness.ca import make_ca
from tests.harness.connector_env import ConnectorEnv, write_config
from tests.harness.daemon import DaemonProcess, job_doc, start_daemon, wait_for
from tests.harness.fixtures_s3 import _remove_bucket
from tests.harness.moto import free_port as free_api_port
from tests.harness.postgres import free_port, private_postgres
from tests.integration.test_daemon_recovery import (
    assert_restores,
    connector_snapshots,
    create_job,
    open_uploads,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
HEARTBEAT = 0.5
LEASE = 3.0


def fleet_extra(url: str, key_file: Path, member: str, daemon_extra: str = "") -> str:
    return f"""
[store]
key_file = "{key_file}"

[daemon]
sync_interval = 0.3
admission_interval = 0.3
max_disks_per_vm = 1
max_runs_per_host = 12
stage_retries = 2
retry_backoff = 0.2
discovery_interval = 3600
shutdown_deadline = 5
stale_upload_age = 3600
{daemon_extra}

[fleet]
database_url = "{url}"
member_id = "{member}"
heartbeat_interval = {HEARTBEAT}
lease_timeout = {LEASE}
max_concurrent_runs = 6
"""


@pytest.fixture
def bucket(moto: Any) -> Iterator[str]:
    s3 = moto.boto3_client()
    name = f"t-{uuidlib.uuid4().hex[:20]}"
    s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": moto.region})
    try:
        yield name
    finally:
        _remove_bucket(s3, name)


def fleet_envs(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, url: str, n: int, daemon_extra: str = ""
) -> list[ConnectorEnv]:
    key_file = tmp_path / "shared" / "store.key"
    generate_key_file(key_file)
    return [
        write_config(
            tmp_path / f"c{i}",
            vcsim,
            moto,
            bucket,
            s3={"multipart_threshold": 5 * MiB, "multipart_part_size": 5 * MiB},
            extra=fleet_extra(url, key_file, f"member-{i}", daemon_extra),
        )
        for i in range(n)
    ]


def make_vm(vcsim: Any, name: str, seed: int, data: int) -> tuple[str, dict[int, str]]:
    rng = random.Random(seed)
    uuid = vcsim.add_vm(name, [16 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    vcsim.write(uuid, key, 1 * MiB, rng.randbytes(data))
    sha = hashlib.sha256(vcsim.read_disk(uuid, key)).hexdigest()
    return uuid, {key: sha}


def ended(env: ConnectorEnv, job: str) -> dict[str, Any] | None:
    found: list[dict[str, Any]] = job_doc(env, job)["runs"]
    done = [r for r in found if r["state"] in ("COMPLETED", "FAILED")]
    return done[0] if done and len(done) == len(found) else None


def stop_all(daemons: list[DaemonProcess]) -> None:
    for d in daemons:
        if d.proc.poll() is None:
            d.proc.terminate()
    for d in daemons:
        try:
            d.proc.wait(30)
        finally:
            d.kill()


def stage_entries(url: str) -> list[dict[str, Any]]:
    db = Database(url)
    try:
        with db.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(sa.select(stage_log).order_by("id"))]
    finally:
        db.close()


def assert_never_two_at_once(entries: list[dict[str, Any]]) -> None:
    """Per VM, each stage began after the one before it ended (whoever ran them)."""
    by_vm: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_vm.setdefault(e["server_id"], []).append(e)
    for server, stages in by_vm.items():
        stages.sort(key=lambda e: e["started"])
        for before, after in itertools.pairwise(stages):
            end = before["ended"] if before["ended"] is not None else float("inf")
            assert end <= after["started"], (
                f"VM {server}: {before['member']} ran {before['stage']} until {end} while "
                f"{after['member']} started {after['stage']} at {after['started']}"
            )


def test_three_connectors_share_twelve_vms(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, pg_url: str
) -> None:
    envs = fleet_envs(tmp_path, vcsim, moto, bucket, pg_url, 3)
    vms = [
        make_vm(vcsim, f"fleet-{n}-{uuidlib.uuid4().hex[:6]}", seed=100 + n, data=1 * MiB)
        for n in range(12)
    ]
    daemons = [start_daemon(env, f"member-{i}") for i, env in enumerate(envs)]
    try:
        for d in daemons:
            d.wait_ready(timeout=120)
        jobs = [create_job(envs[n % 3], uuid) for n, (uuid, _) in enumerate(vms)]
        results = [
            wait_for(f"the run of {job}", lambda job=job: ended(envs[0], job), timeout=300)  # type: ignore[misc]
            for job in jobs
        ]
        status = envs[2].cli("fleet", "status", "--json")
        table = envs[0].cli("fleet", "status")
    finally:
        stop_all(daemons)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["alive"] == 3 and doc["this_member"] == "member-2"
    assert {m["id"] for m in doc["members"]} == {"member-0", "member-1", "member-2"}
    assert doc["leader"] in {"member-0", "member-1", "member-2"}
    assert sum(m["leader"] for m in doc["members"]) == 1
    assert all(m["heartbeat_age"] < LEASE for m in doc["members"])
    assert table.returncode == 0 and "3 of 3 member(s) alive" in table.stdout
    logs = "\n".join(d.log() for d in daemons)
    for run in results:
        assert run["state"] == "COMPLETED", f"{run}\n{logs}"
    for run, (_uuid, shas) in zip(results, vms, strict=True):
        assert_restores(envs[1], tmp_path, run, shas)
    entries = stage_entries(pg_url)
    assert {e["server_id"] for e in entries} == {r["server_id"] for r in results}
    assert_never_two_at_once(entries)
    workers = {e["member"] for e in entries}
    assert workers == {"member-0", "member-1", "member-2"}, workers
    db = Database(pg_url)
    try:
        with db.engine.connect() as c:
            keys = [r.schedule_key for r in c.execute(sa.select(runs.c.schedule_key))]
    finally:
        db.close()
    assert len(keys) == 12 and len(set(keys)) == 12  # one run per schedule slot
    for uuid, _ in vms:
        assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, bucket) == []


def test_a_killed_connectors_run_is_completed_by_another(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, pg_url: str
) -> None:
    envs = fleet_envs(tmp_path, vcsim, moto, bucket, pg_url, 3)
    uuid, shas = make_vm(vcsim, f"failover-{uuidlib.uuid4().hex[:6]}", seed=7, data=7 * MiB)
    victim = start_daemon(
        envs[0], "victim", extra_env={"CONNECTOR_TEST_CRASH_AT": "multipart-part:1"}
    )
    others: list[DaemonProcess] = []
    try:
        victim.wait_ready(timeout=120)
        job = create_job(envs[0], uuid)
        victim.wait_killed(timeout=180)
        killed_at = time.monotonic()
        assert connector_snapshots(vcsim, uuid), "the kill left no snapshot to clean up"
        assert open_uploads(moto, bucket), "the kill left no multipart upload to abort"
        others = [start_daemon(env, f"member-{i}") for i, env in enumerate(envs[1:], 1)]
        run = wait_for("the run to be completed", lambda: ended(envs[1], job), timeout=180)
        took = time.monotonic() - killed_at
    finally:
        stop_all([victim, *others])
    logs = "\n".join(d.log() for d in others)
    assert run["state"] == "COMPLETED", f"{run}\n{logs}"
    assert took < LEASE + 90, f"the takeover took {took:.0f} s"
    assert "run taken over" in logs
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, bucket) == []
    assert_restores(envs[2], tmp_path, run, shas)
    entries = stage_entries(pg_url)
    members = [e["member"] for e in entries]
    assert members[0] == "member-0"  # the victim started the run
    assert set(members[1:]) - {"member-0"}, members  # another one finished it
    assert_never_two_at_once([e for e in entries if e["ended"] is not None])


def start_member_with_api(
    work: Path,
    vcsim: Any,
    moto: Any,
    bucket: str,
    url: str,
    key_file: Path,
    member: str,
    ca: CA,
    extra_env: dict[str, str] | None = None,
) -> Api:
    """`connector run` in the fleet of `url`, with its HTTPS API on a free port."""
    work.mkdir(parents=True)
    token_file = work / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = free_api_port()
    cert = ca.issue(f"fleet-api-{port}")
    env = write_config(
        work,
        vcsim,
        moto,
        bucket,
        extra=fleet_extra(url, key_file, member) + api_section(port, cert, token_file),
    )
    daemon = start_daemon(env, member, extra_env=extra_env)
    return Api(env, daemon, port, ca.cert_file, "", cert.cert_file)


def fleet_of(api: Api, alive: int) -> dict[str, Any] | None:
    """/v1/fleet's document once it answers with `alive` members ALIVE, else None."""
    status, doc = api.call("GET", "/v1/fleet")
    return doc if status == 200 and doc["alive"] == alive else None


def test_the_api_of_each_member_shows_the_fleet_as_the_cli_does(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, pg_url: str, test_ca: CA
) -> None:
    key_file = tmp_path / "shared" / "store.key"
    generate_key_file(key_file)
    # whichever member takes the run holds it once its VM snapshot exists, until the test
    # removes that member's marker file: what it runs is then known
    markers = [tmp_path / f"paused-{i}" for i in range(2)]
    apis = [
        start_member_with_api(
            tmp_path / f"c{i}",
            vcsim,
            moto,
            bucket,
            pg_url,
            key_file,
            f"member-{i}",
            test_ca,
            extra_env={
                "CONNECTOR_TEST_PAUSE_AT": "snapshot-created:1",
                "CONNECTOR_TEST_PAUSE_FILE": str(markers[i]),
            },
        )
        for i in range(2)
    ]
    uuid, _ = make_vm(vcsim, f"fleet-api-{uuidlib.uuid4().hex[:6]}", seed=3, data=256 * 1024)

    def both_alive_with_a_leader() -> dict[str, Any] | None:
        status, doc = apis[1].call("GET", "/v1/fleet")
        assert status == 200, doc
        return doc if doc["alive"] == 2 and doc["leader"] else None

    def paused_member() -> str | None:
        found = next((f"member-{i}" for i, m in enumerate(markers) if m.exists()), None)
        if found is None and ended(apis[0].env, job):
            logs = "\n".join(a.daemon.log() for a in apis)
            raise AssertionError(f"the run ended unheld: {job_doc(apis[0].env, job)}\n{logs}")
        return found

    try:
        for a in apis:
            a.daemon.wait_ready(timeout=120)
        wait_for("two members and a leader", both_alive_with_a_leader, timeout=60)
        job = create_job(apis[0].env, uuid)
        worker = wait_for("a member to hold the run", paused_member, timeout=120, every=0.05)
        run = job_doc(apis[0].env, job)["runs"][0]
        doc = wait_for("two members and a leader", both_alive_with_a_leader, timeout=60)
        cli = apis[1].env.cli("fleet", "status", "--json")
        status0, doc0 = apis[0].call("GET", "/v1/fleet")
        for m in markers:
            m.unlink(missing_ok=True)
        ended_run = wait_for("the run to end", lambda: ended(apis[0].env, job), timeout=120)
    finally:
        for m in markers:
            m.unlink(missing_ok=True)
        stop_all([a.daemon for a in apis])
    assert cli.returncode == 0, cli.stderr
    shown = json.loads(cli.stdout)
    assert status0 == 200 and doc0["this_member"] == "member-0"
    assert doc["this_member"] == "member-1" and doc["leader"] in {"member-0", "member-1"}
    assert [m["id"] for m in doc["members"]] == ["member-0", "member-1"]
    assert [m["leader"] for m in doc["members"]] == [
        m["id"] == doc["leader"] for m in doc["members"]
    ]
    for m in doc["members"]:
        assert m["state"] == "ALIVE" and 0 <= m["heartbeat_age"] < LEASE
        assert m["version"] and m["host"] and m["pid"] > 0
        assert "transport:datastore-https" in m["capabilities"], m
    # what each one runs: the held run on the member that holds it, nothing on the other
    running = {m["id"]: m["running"] for m in doc["members"]}
    assert running.pop(worker) == [
        {"run_id": run["id"], "server_id": run["server_id"], "stage": run["stage"]}
    ]
    assert list(running.values()) == [[]]
    assert ended_run["state"] == "COMPLETED", ended_run

    # the same document as the command's, but for the heartbeats' ages
    def steady(d: dict[str, Any]) -> dict[str, Any]:
        return {**d, "members": [{**m, "heartbeat_age": None} for m in d["members"]]}

    assert steady(doc) == steady(shown)
    assert steady(doc0) == {**steady(shown), "this_member": "member-0"}
    for a in apis:
        assert TOKEN not in a.daemon.log()


def test_the_fleet_api_says_when_the_database_does_not_answer_and_recovers(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, test_ca: CA
) -> None:
    key_file = tmp_path / "shared" / "store.key"
    generate_key_file(key_file)
    with private_postgres() as pg:
        url = pg.create_database("fleet")
        api = start_member_with_api(
            tmp_path / "c0", vcsim, moto, bucket, url, key_file, "member-0", test_ca
        )
        try:
            api.daemon.wait_ready(timeout=120)
            before = wait_for(
                "the member in /v1/fleet",
                lambda: fleet_of(api, alive=1),
                timeout=60,
            )
            pg.stop("fast")
            down = api.call("GET", "/v1/fleet")
            pg.start()
            after = wait_for(
                "/v1/fleet once the database is back",
                lambda: fleet_of(api, alive=1),
                timeout=60,
            )
            alive = api.daemon.proc.poll() is None
        finally:
            stop_all([api.daemon])
    assert [m["id"] for m in before["members"]] == ["member-0"]
    assert before["leader"] in ("member-0", None)
    status, body = down
    assert status == 503, body
    assert f"the fleet database postgresql://postgres@127.0.0.1:{pg.port}/fleet" in body["error"]
    assert "does not answer" in body["error"] and "PostgreSQL" in body["error"]
    assert after["this_member"] == "member-0" and alive, api.daemon.log()


def test_fleet_status_without_a_fleet_is_a_config_error(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str
) -> None:
    env = write_config(tmp_path, vcsim, moto, bucket)
    proc = env.cli("fleet", "status")
    assert proc.returncode == 2
    assert "not in a fleet" in proc.stderr and "[fleet]" in proc.stderr


def test_the_leader_stopped_another_schedules_and_no_slot_fires_twice_or_is_lost(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str, pg_url: str
) -> None:
    unit = 3.0  # one scheduling "hour"
    envs = fleet_envs(tmp_path, vcsim, moto, bucket, pg_url, 3, f"schedule_unit_seconds = {unit}")
    uuid, _ = make_vm(vcsim, f"sched-{uuidlib.uuid4().hex[:6]}", seed=9, data=256 * 1024)
    daemons = [start_daemon(env, f"member-{i}") for i, env in enumerate(envs)]
    db = Database(pg_url)

    def slots() -> list[str]:
        with db.engine.connect() as c:
            rows = c.execute(sa.select(runs.c.schedule_key).where(runs.c.schedule_key.is_not(None)))
            return sorted(r.schedule_key for r in rows if not r.schedule_key.endswith("@seed"))

    def leader() -> str | None:
        with db.engine.connect() as c:
            return c.execute(sa.text("SELECT holder FROM leases WHERE name = 'scheduler'")).scalar()

    try:
        for d in daemons:
            d.wait_ready(timeout=120)
        create_job(envs[0], uuid, frequency=1)
        wait_for("three slots", lambda: len(slots()) >= 3, timeout=60)
        first = wait_for("a leader", leader, timeout=30)
        index = int(first.rsplit("-", 1)[1])
        assert daemons[index].terminate() == 0
        before = len(slots())
        second = wait_for("another leader", lambda: (leader() or first) != first and leader())
        wait_for("three more slots", lambda: len(slots()) >= before + 3, timeout=60)
    finally:
        stop_all(daemons)
    keys = slots()
    db.close()
    assert second != first
    assert len(keys) == len(set(keys))  # no slot made two runs
    times = [dt.datetime.strptime(k.split("@", 1)[1], "%Y-%m-%dT%H:%M:%S.%fZ") for k in keys]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert all(abs(g - unit) < 0.01 for g in gaps), f"a slot was lost: {gaps}"


def test_postgresql_restarted_during_runs_the_connectors_reconnect(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str
) -> None:
    with private_postgres() as pg:
        url = pg.create_database("fleet")
        envs = fleet_envs(tmp_path, vcsim, moto, bucket, url, 2)
        vms = [
            make_vm(vcsim, f"pgrestart-{n}-{uuidlib.uuid4().hex[:6]}", seed=200 + n, data=6 * MiB)
            for n in range(4)
        ]
        daemons = [start_daemon(env, f"member-{i}") for i, env in enumerate(envs)]
        try:
            for d in daemons:
                d.wait_ready(timeout=120)
            jobs = [create_job(envs[n % 2], uuid) for n, (uuid, _) in enumerate(vms)]

            def transferring() -> bool:
                return any(e["stage"] == "transfer" for e in stage_entries(url))

            wait_for("a run in its transfer stage", transferring, timeout=120, every=0.05)
            pg.stop("fast")  # every connection of every connector breaks
            pg.start()
            results = [
                wait_for(f"the run of {job}", lambda job=job: ended(envs[1], job), timeout=300)  # type: ignore[misc]
                for job in jobs
            ]
            alive = [d.proc.poll() is None for d in daemons]
            status = envs[0].cli("fleet", "status", "--json")
        finally:
            stop_all(daemons)
        logs = "\n".join(d.log() for d in daemons)
        assert alive == [True, True], logs
        assert status.returncode == 0 and json.loads(status.stdout)["alive"] == 2, status.stderr
        for run, (uuid, shas) in zip(results, vms, strict=True):
            assert run["state"] in ("COMPLETED", "FAILED"), run
            if run["state"] == "FAILED":
                assert run["error"], f"a run failed without a reason: {run}"
            else:
                assert_restores(envs[0], tmp_path, run, shas)
            assert connector_snapshots(vcsim, uuid) == []
        assert any(r["state"] == "COMPLETED" for r in results), logs
        assert open_uploads(moto, bucket) == []
        # nothing lost: each job has its one run, ended
        for job in jobs:
            assert len(job_doc(envs[0], job)["runs"]) == 1


@pytest.mark.parametrize("point", ["snapshot-created", "multipart-part", "before-commit"])
def test_one_connector_on_postgresql_killed_at_a_point_then_restarted(
    point: str, tmp_path: Path, vcsim: Any, moto: Any, bucket: str, pg_url: str
) -> None:
    """The daemon's crash safety holds with its state and queue in PostgreSQL."""
    (env,) = fleet_envs(tmp_path, vcsim, moto, bucket, pg_url, 1)
    uuid, shas = make_vm(vcsim, f"pgcrash-{uuidlib.uuid4().hex[:6]}", seed=31, data=7 * MiB)
    crashed = start_daemon(env, "crashed", extra_env={"CONNECTOR_TEST_CRASH_AT": f"{point}:1"})
    restarted: DaemonProcess | None = None
    try:
        crashed.wait_ready(timeout=120)
        job = create_job(env, uuid)
        crashed.wait_killed(timeout=180)
        restarted = start_daemon(env, "restarted")
        restarted.wait_ready(timeout=120)
        run = wait_for("the run to end", lambda: ended(env, job), timeout=180)
    finally:
        stop_all([crashed, *([restarted] if restarted else [])])
    assert run["state"] == "COMPLETED", f"{run}\n{restarted.log() if restarted else ''}"
    assert connector_snapshots(vcsim, uuid) == []
    assert open_uploads(moto, bucket) == []
    assert_restores(env, tmp_path, run, shas)


def test_a_database_that_cannot_be_reached_is_a_clear_error(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str
) -> None:
    port = free_port()  # nothing listens there
    (env,) = fleet_envs(
        tmp_path, vcsim, moto, bucket, f"postgresql://connector@127.0.0.1:{port}/fleet", 1
    )
    proc = env.cli("fleet", "status")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "the fleet database" in proc.stderr and "cannot be reached" in proc.stderr
    assert f"127.0.0.1:{port}/fleet" in proc.stderr


def test_tls_and_a_password_to_the_database(
    tmp_path: Path, vcsim: Any, moto: Any, bucket: str
) -> None:
    """A server that takes only TLS with a password: the connector verifies its
    certificate against ca_file and logs in with the password from its file; a
    wrong password or another CA is a clear config error that never shows it."""
    secret = "db-Pa55-" + uuidlib.uuid4().hex
    ca = make_ca(tmp_path / "ca")
    other_ca = make_ca(tmp_path / "other-ca", "another-ca")
    cert = ca.issue("pg", ("localhost", "127.0.0.1"))
    with private_postgres() as pg:
        pg.execute(f"ALTER USER postgres PASSWORD '{secret}'")
        pg.create_database("fleet")
        crt, key = pg.own(cert.cert_file), pg.own(cert.key_file)
        pg.configure(
            ["ssl = on", f"ssl_cert_file = '{crt}'", f"ssl_key_file = '{key}'"],
            hba=["local all all trust", "hostssl all all 127.0.0.1/32 scram-sha-256"],
        )
        pg.stop()
        pg.start()
        url = f"postgresql://postgres@localhost:{pg.port}/fleet"

        def env_with(password: str, ca_file: Path, name: str) -> ConnectorEnv:
            work = tmp_path / name
            work.mkdir()
            (work / "db-password").write_text(password + "\n")
            return write_config(
                work,
                vcsim,
                moto,
                bucket,
                extra=f"""
[fleet]
database_url = "{url}"
password_file = "{work / "db-password"}"
ca_file = "{ca_file}"
""",
            )

        good = env_with(secret, ca.cert_file, "good").cli("fleet", "status", "--json")
        wrong = env_with("not-" + secret, ca.cert_file, "wrong").cli("fleet", "status")
        untrusted = env_with(secret, other_ca.cert_file, "untrusted").cli("fleet", "status")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["members"] == []
    assert wrong.returncode == 2
    assert "refused the login" in wrong.stderr and "password_file" in wrong.stderr
    assert untrusted.returncode == 2
    assert "TLS to the fleet database" in untrusted.stderr and "ca_file" in untrusted.stderr
    for proc in (good, wrong, untrusted):
        assert secret not in proc.stdout + proc.stderr
