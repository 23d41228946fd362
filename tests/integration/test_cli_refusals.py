"""What the `connector` command refuses, as a user meets it: exit status and the message
the troubleshooting guide documents (docs/troubleshooting.md)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.harness.connector_env import ConnectorEnv, write_config
from tests.integration.store_helpers import MiB, write_blocks

pytestmark = pytest.mark.integration

RUN = "r-20260101T000000000Z-00000000"


@pytest.fixture
def env(tmp_path: Path, vcsim: Any, moto: Any, s3_bucket: str) -> ConnectorEnv:
    return write_config(tmp_path / "connector", vcsim, moto, s3_bucket)


def refused(env: ConnectorEnv, code: int, message: str, *args: str) -> None:
    proc = env.cli(*args)
    assert proc.returncode == code, (args, proc.stdout, proc.stderr)
    assert f"error: {message}" in " ".join(proc.stderr.split()), (args, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_store_commands_refuse_what_they_cannot_do(
    env: ConnectorEnv, vcsim: Any, moto: Any, s3_bucket: str, tmp_path: Path
) -> None:
    name = "refusals-store"
    uuid = vcsim.add_vm(name, [4 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {0: random.Random(5).randbytes(MiB)})
    assert env.cli("replicate", name).returncode == 0
    (run,) = env.cli_json("runs", name)
    run_id = run["id"]
    refused(
        env,
        2,
        f"unexpected argument '{run_id}'; to show a run: runs show RUN",
        "runs",
        name,
        run_id,
    )
    # the same key, another prefix of the bucket: no store there to rebuild the state from
    key_file = env.workdir / "state" / "store.key"
    other = write_config(
        tmp_path / "other",
        vcsim,
        moto,
        s3_bucket,
        prefix="elsewhere",
        extra=f'[store]\nkey_file = "{key_file}"\n',
    )
    refused(
        other,
        1,
        "the bucket holds no replica store at this prefix (no config object): there "
        "is nothing to rebuild the state from; check [s3] bucket and prefix",
        "state",
        "rebuild",
    )
    refused(env, 1, "--remove-server needs the VM whose runs to delete", "purge", "--remove-server")
    refused(
        env,
        1,
        "--remove-server deletes every run of the VM from the store; add --yes to confirm "
        "(or --dry-run to see what would go)",
        "purge",
        name,
        "--remove-server",
    )
    refused(
        env,
        2,
        "--drop-run latest needs the VM: connector purge VM --drop-run latest --yes",
        "purge",
        "--drop-run",
        "latest",
    )
    refused(
        env,
        1,
        f"--drop-run deletes run {RUN} from the store; add --yes to confirm (or --dry-run "
        "to see what would go)",
        "purge",
        name,
        "--drop-run",
        RUN,
    )
    refused(
        env,
        2,
        "--run latest needs the VM: connector verify VM --run latest",
        "verify",
        "--run",
        "latest",
    )
    refused(
        env,
        1,
        f"run {RUN} is not in the store; list runs with `connector runs`",
        "verify",
        "--run",
        RUN,
    )
    refused(
        env,
        1,
        f"run {run_id} has no disk 9999 (its disks: {key})",
        "restore",
        name,
        "--run",
        "latest",
        "--disk",
        "9999",
        "--to",
        str(env.workdir / "x.img"),
    )
    refused(
        env,
        1,
        "no VM named or with instance UUID 'no-such-vm'; list them with `connector vms`",
        "restore",
        "no-such-vm",
        "--run",
        "latest",
        "--disk",
        "2000",
        "--to",
        str(env.workdir / "y.img"),
    )


def test_job_commands_refuse_what_they_cannot_do(env: ConnectorEnv, vcsim: Any) -> None:
    name = "refusals-jobs"
    vcsim.add_vm(name, [4 * MiB])
    assert env.cli("vms").returncode == 0
    refused(
        env,
        2,
        "give either --frequency or --run-once, not both",
        "jobs",
        "create",
        name,
        "--frequency",
        "12",
        "--run-once",
    )
    refused(env, 2, "give --frequency HOURS (1 to 24), or --run-once", "jobs", "create", name)
    job = env.cli_json("jobs", "create", name, "--frequency", "12")
    refused(
        env,
        2,
        f"the VM already has job {job['id']} ({job['state']}); change it with "
        "`connector jobs update` or delete it first",
        "jobs",
        "create",
        name,
        "--run-once",
    )
    refused(
        env,
        2,
        "nothing to change: give --frequency/--run-once, --seed, --retention, --description "
        "or a landing option (--land, --keep-amis, --staging, ...)",
        "jobs",
        "update",
        name,
    )
    refused(
        env,
        1,
        "no job 'nothing-here' (by job id, VM name or instance UUID); list them with "
        "`connector jobs list`",
        "jobs",
        "show",
        "nothing-here",
    )
    assert env.cli("jobs", "delete", name).returncode == 0
    refused(
        env,
        2,
        f"job {job['id']} is DELETED; create a new job for the VM",
        "jobs",
        "pause",
        job["id"],
    )


def test_names_that_match_several_vms_or_jobs_ask_for_the_id(env: ConnectorEnv, vcsim: Any) -> None:
    name = "refusals-twins"
    first = vcsim.add_vm(name, [4 * MiB])
    second = vcsim.add_vm(name, [4 * MiB])
    assert env.cli("vms").returncode == 0
    refused(
        env,
        2,
        f"2 VMs are named {name!r} ({', '.join(sorted([first, second]))}); use the instance UUID",
        "restore",
        name,
        "--run",
        "latest",
        "--disk",
        "2000",
        "--to",
        str(env.workdir / "z.img"),
    )
    jobs = [env.cli_json("jobs", "create", uuid, "--frequency", "12") for uuid in (first, second)]
    proc = env.cli("jobs", "show", name)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: 2 jobs match {name!r} (") and line.endswith("); use the job id")
    assert all(j["id"] in line for j in jobs)


def test_health_without_an_api_section_says_there_is_nothing_to_check(env: ConnectorEnv) -> None:
    refused(env, 2, "the API is not configured (no api section): nothing to check", "health")


def test_the_api_command_without_an_api_section_says_what_to_add(env: ConnectorEnv) -> None:
    refused(
        env,
        2,
        "the API is not configured: add an [api] section with listen, cert_file, "
        "key_file and token_file (see docs/api.md)",
        "api",
    )


def test_a_lost_store_key_is_never_replaced_by_a_new_one(
    env: ConnectorEnv, vcsim: Any, moto: Any, s3_bucket: str, tmp_path: Path
) -> None:
    name = "refusals-key"
    uuid = vcsim.add_vm(name, [4 * MiB])
    (key,) = vcsim.disk_keys(uuid)
    write_blocks(vcsim, uuid, key, {0: random.Random(6).randbytes(MiB)})
    assert env.cli("replicate", name).returncode == 0
    key_file = env.workdir / "state" / "store.key"
    key_file.rename(env.workdir / "store.key.bak")
    refused(
        env,
        2,
        f"the store key file {key_file} is missing but the bucket already holds a "
        "replica store; restore the key file from your backup",
        "replicate",
        name,
    )
    assert not key_file.exists()
    # a store key given as a systemd credential that the unit does not load
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    other = write_config(
        tmp_path / "other",
        vcsim,
        moto,
        s3_bucket,
        prefix="credential-store",
        extra='[store]\nkey_file = "credential:store-key"\n',
    )
    proc = other.cli("replicate", name, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert proc.returncode == 2, proc.stderr
    assert (
        "error: the store key credential store-key is missing from $CREDENTIALS_DIRECTORY; "
        "create the key file (32 random bytes, base64) and load it with LoadCredential="
        in (" ".join(proc.stderr.split()))
    ), proc.stderr


def test_check_only_with_an_unknown_name_lists_the_known_checks(env: ConnectorEnv) -> None:
    proc = env.cli("check", "--only", "no-such-check")
    assert proc.returncode == 2, proc.stderr
    assert "error: unknown check(s): no-such-check; known: " in proc.stderr
