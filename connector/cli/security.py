"""`connector check`, `bucket-policy`, `iam-policy` and `audit verify`.

`check` runs the registry of connector/check.py against a live setup and exits
1 when a check fails; the policy commands print JSON documents derived from the
config; `audit verify` checks the audit log's hash chain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from connector.audit import verify as verify_audit
from connector.cli.common import ConfigOpt, JsonOpt, err, out, print_checks, run_with_app
from connector.errors import ConfigError
from connector.policies import bucket_policy, iam_policy, is_kms_key_arn

if TYPE_CHECKING:
    from connector.app import App

audit_app = typer.Typer(
    rich_markup_mode="markdown", no_args_is_help=True, help="The append-only audit log."
)


@audit_app.command("verify")
def audit_verify(
    file: Annotated[
        Path | None,
        typer.Option("--file", help="Audit log to check (default: the configured one)."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Check the hash chain; name the first line that was changed or removed."""

    def check(path: Path) -> None:
        result = verify_audit(path)
        if result.ok:
            out.print(f"{path}: {result.records} records, chain intact")
            return
        for problem in result.problems:
            err.print(f"[red]broken:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        err.print(f"{path}: the chain breaks at line {result.first_bad_line}", highlight=False)
        raise typer.Exit(1)

    if file is not None:
        try:
            check(file)
        except ConfigError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        return
    run_with_app(config, lambda a: check(a.config.audit_path), audit_load=False)


def bucket_policy_cmd(config: ConfigOpt = None) -> None:
    """Print a policy for the staging bucket that denies plain HTTP, old TLS and unencrypted puts.

    The three denials: requests without TLS (aws:SecureTransport), TLS below 1.2
    (s3:TlsVersion), and PutObject without the configured server-side encryption.
    """

    def go(a: App) -> None:
        s3 = a.config.require_s3()
        if s3.sse == "aws:kms" and s3.kms_key_id and not is_kms_key_arn(s3.kms_key_id):
            err.print(
                "note: kms_key_id is not a key ARN, so the policy cannot pin the KMS key; "
                "it still requires aws:kms",
                highlight=False,
            )
        policy = bucket_policy(s3.bucket, s3.region, s3.sse, s3.kms_key_id)
        print(json.dumps(policy, indent=2))

    run_with_app(config, go, audit_load=False)


def iam_policy_cmd(
    config: ConfigOpt = None,
    landing: Annotated[
        bool, typer.Option("--landing", help="Add the EBS and EC2 actions of the landing stage.")
    ] = False,
) -> None:
    """Print the least-privilege IAM policy for the connector's AWS credentials."""

    def go(a: App) -> None:
        s3 = a.config.require_s3()
        kms = s3.kms_key_id if s3.sse == "aws:kms" and is_kms_key_arn(s3.kms_key_id) else None
        land = a.config.landing
        land_kms = land.kms_key_id if is_kms_key_arn(land.kms_key_id) else None
        role = f"arn:aws:iam::*:role/{land.role_name}" if land.role_name else None
        policy = iam_policy(
            s3.bucket,
            s3.prefix,
            s3.region,
            kms,
            landing=landing,
            landing_kms_key_arn=land_kms if landing else None,
            landing_role_arn=role if landing else None,
        )
        print(json.dumps(policy, indent=2))

    run_with_app(config, go, audit_load=False)


def check_cmd(
    config: ConfigOpt = None,
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this check (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check a live setup: one table of check, result and fix; exit 1 if any fails.

    The config, secrets and their file permissions, vCenter (TLS 1.2+, trusted
    certificate, login, privileges), S3 (reachable, writable, encrypted by
    default), the KMS key, the clock against AWS, free space for the state, the
    audit log, VDDK.
    """

    def go(a: App) -> int:
        from connector.check import run_checks

        try:
            results = run_checks(a, only or ())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return print_checks(results, as_json)

    if run_with_app(config, go):
        raise typer.Exit(1)
