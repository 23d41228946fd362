"""`connector init`: write a commented config, create the state folder, run the checks.

Values come from flags; in a terminal, what the flags leave out is asked for.
Secrets are never written into the config, only references to them:
`file:PATH`, `env:VARIABLE` or `credential:NAME` (a systemd credential).
An existing config is replaced only with --force (the old one is kept as
FILE.bak); writing it is recorded in the audit log (`config.init`). The state
folder is created with mode 0700. The command ends with `connector check`
against the new config (--no-check skips it) and exits as it does.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from connector.audit import SUCCESS, AuditLog
from connector.cli.common import err, out, print_checks, run_with_app
from connector.errors import ConfigError, InvalidInputError, PermanentError
from connector.secrets import CREDENTIAL_PREFIX

DEFAULT_STATE_DIR = Path("/var/lib/connector")
SECRET_FORMS = "file:PATH, env:VARIABLE or credential:NAME"  # noqa: S105 - the forms, no secret


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is read from: a file, an environment variable or a credential."""

    kind: str  # "file", "env" or "credential"
    value: str

    def toml(self, file_key: str, env_key: str) -> str:
        """The config line of this reference, e.g. `password_file = "/etc/..."`."""
        if self.kind == "env":
            return f"{env_key} = {_q(self.value)}"
        if self.kind == "credential":
            return f"{file_key} = {_q(CREDENTIAL_PREFIX + self.value)}"
        return f"{file_key} = {_q(self.value)}"


def parse_secret_ref(text: str, option: str) -> SecretRef:
    """`file:PATH`, `env:VARIABLE` or `credential:NAME`; anything else is refused.

    The refusal never repeats what was given: it may be the secret itself.
    """
    kind, sep, value = text.strip().partition(":")
    if not sep or kind not in ("file", "env", "credential") or not value:
        raise InvalidInputError(
            f"{option} takes a reference to the secret, never the secret itself: "
            f"{SECRET_FORMS} (the value given is not shown)"
        )
    if kind == "file":
        return SecretRef("file", str(Path(value).expanduser().absolute()))
    if kind == "env":
        if not value.replace("_", "").isalnum() or value[0].isdigit():
            raise InvalidInputError(
                f"{option}: env:{value} is not an environment variable name (letters, digits, _)"
            )
        return SecretRef("env", value)
    if "/" in value or value in (".", ".."):
        raise InvalidInputError(
            f"{option}: credential:{value} must be a plain credential name, as in the unit's "
            "LoadCredential=NAME:/etc/connector/credentials/NAME"
        )
    return SecretRef("credential", value)


def vcenter_url(text: str) -> str:
    """A vCenter host name or URL as the SDK URL: `vc.example.com` -> https://vc.example.com/sdk."""
    text = text.strip()
    if "://" not in text:
        text = f"https://{text}"
    parts = urlsplit(text)
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidInputError(f"--vcenter {text!r}: give a host name or an https:// URL")
    if parts.username or parts.password:
        raise InvalidInputError(
            "--vcenter must not carry a user name or password; use --vcenter-user and "
            "--vcenter-password"
        )
    return text if parts.path not in ("", "/") else f"https://{parts.netloc}/sdk"


@dataclass
class InitSettings:
    """What `connector init` writes."""

    vcenter: str
    user: str
    password: SecretRef
    bucket: str
    region: str
    state_dir: Path
    ca_file: Path | None = None
    thumbprint: str | None = None
    prefix: str = "connector"
    endpoint_url: str | None = None
    s3_ca_file: Path | None = None
    access_key_id: str | None = None
    secret_key: SecretRef | None = None
    sse: str = "AES256"
    kms_key_id: str | None = None
    notes: list[str] = field(default_factory=list)


def render_config(s: InitSettings) -> str:
    """The config file's text: every setting commented, secrets only as references."""
    trust = (
        f"ca_file = {_q(s.ca_file)}                # the CA that signed vCenter's certificate"
        if s.ca_file is not None
        else f"thumbprint = {_q(s.thumbprint)}   # SHA-256 of vCenter's certificate"
        if s.thumbprint is not None
        else '# ca_file = "/etc/connector/vcenter-ca.pem"   # default: the system\'s trust store'
    )
    lines = [
        "# The connector's configuration, written by `connector init`.",
        "# It holds no secret: each secret is a file, an environment variable or a",
        "# systemd credential named here. Every setting: README.md and docs/operations.md.",
        "# Check it against the live setup with `connector check`.",
        "",
        "[vcenter]",
        f"url = {_q(s.vcenter)}",
        f"user = {_q(s.user)}",
        s.password.toml("password_file", "password_env") + "   # never the password itself",
        trust,
        "enable_cbt = true                # turn Changed Block Tracking on for VMs that lack it",
        "",
        "[s3]",
        f"bucket = {_q(s.bucket)}",
        f"prefix = {_q(s.prefix)}",
        f"region = {_q(s.region)}",
        f"endpoint_url = {_q(s.endpoint_url)}"
        if s.endpoint_url
        else '# endpoint_url = "https://s3.eu-central-1.amazonaws.com"   # S3-compatible stores',
        f"ca_file = {_q(s.s3_ca_file)}"
        if s.s3_ca_file is not None
        else '# ca_file = "/etc/connector/s3-ca.pem"   # default: the system\'s trust store',
        f"sse = {_q(s.sse)}                  # server-side encryption of every put",
    ]
    if s.kms_key_id:
        lines.append(f"kms_key_id = {_q(s.kms_key_id)}")
    if s.access_key_id is not None and s.secret_key is not None:
        lines += [
            f"access_key_id = {_q(s.access_key_id)}",
            s.secret_key.toml("secret_access_key_file", "secret_access_key_env"),
        ]
    else:
        lines.append(
            "# access_key_id and secret_access_key_file: default, the AWS credential chain"
        )
    lines += [
        "",
        "[state]",
        f"path = {_q(s.state_dir / 'state.db')}   # a cache of the store; store.key beside it",
        "",
        "[store]",
        "# key_file = default: store.key beside the state database (back it up!)",
        '# kms_key_id = "alias/connector-replicas"   # AWS KMS instead of a key file',
        "",
        "[retention]",
        "keep = 0                         # runs kept per VM without its own --retention; 0: all",
        "",
        "[log]",
        'level = "info"',
        "",
    ]
    return "\n".join(lines)


def _q(value: object) -> str:
    """A TOML basic string."""
    return json.dumps(str(value))


# ------------------------------------------------------------------------- the command

VcenterOpt = Annotated[
    str | None, typer.Option("--vcenter", help="vCenter host name or https:// URL.")
]


def init_cmd(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Where to write the config (default: $CONNECTOR_CONFIG or "
            "/etc/connector/connector.toml).",
        ),
    ] = None,
    vcenter: VcenterOpt = None,
    vcenter_user: Annotated[
        str | None, typer.Option("--vcenter-user", help="vCenter user name.")
    ] = None,
    vcenter_password: Annotated[
        str | None,
        typer.Option("--vcenter-password", help=f"Where the vCenter password is: {SECRET_FORMS}."),
    ] = None,
    vcenter_ca_file: Annotated[
        Path | None,
        typer.Option("--vcenter-ca-file", help="CA file that vCenter's cert chains to."),
    ] = None,
    vcenter_thumbprint: Annotated[
        str | None,
        typer.Option("--vcenter-thumbprint", help="SHA-256 thumbprint of vCenter's certificate."),
    ] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="S3 staging bucket.")] = None,
    prefix: Annotated[
        str, typer.Option("--prefix", help="Key prefix in the bucket.")
    ] = "connector",
    region: Annotated[
        str | None, typer.Option("--region", help="AWS region of the bucket.")
    ] = None,
    endpoint_url: Annotated[
        str | None, typer.Option("--endpoint-url", help="S3 endpoint (S3-compatible stores).")
    ] = None,
    s3_ca_file: Annotated[
        Path | None, typer.Option("--s3-ca-file", help="CA file for the S3 endpoint.")
    ] = None,
    access_key_id: Annotated[
        str | None,
        typer.Option("--access-key-id", help="AWS access key id (default: the AWS chain)."),
    ] = None,
    secret_key: Annotated[
        str | None,
        typer.Option("--secret-key", help=f"Where the AWS secret access key is: {SECRET_FORMS}."),
    ] = None,
    sse: Annotated[
        str, typer.Option("--sse", help="Server-side encryption: AES256 or aws:kms.")
    ] = "AES256",
    kms_key_id: Annotated[
        str | None, typer.Option("--kms-key-id", help="KMS key for sse = aws:kms.")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir", help=f"State folder, created 0700 (default {DEFAULT_STATE_DIR})."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing config (kept as FILE.bak).")
    ] = False,
    no_check: Annotated[
        bool, typer.Option("--no-check", help="Do not run `connector check` at the end.")
    ] = False,
) -> None:
    """Write a commented config and the state folder, then run `connector check`.

    In a terminal, what the flags leave out is asked for. Secrets are given as
    references (file:PATH, env:VARIABLE, credential:NAME), never as values.
    """
    from connector.config import config_path

    path = config_path(config)
    try:
        if path.exists() and not force:
            raise InvalidInputError(
                f"the config file {path} already exists; pass --force to replace it "
                f"(the old one is kept as {path.name}.bak), or --config to write another"
            )
        ask = _Asker(sys.stdin.isatty())
        url = vcenter_url(ask("vCenter host name or URL", vcenter, "--vcenter"))
        user = ask("vCenter user", vcenter_user, "--vcenter-user")
        password = parse_secret_ref(
            ask(f"vCenter password, as {SECRET_FORMS}", vcenter_password, "--vcenter-password"),
            "--vcenter-password",
        )
        if vcenter_ca_file is not None and vcenter_thumbprint is not None:
            raise InvalidInputError("give --vcenter-ca-file or --vcenter-thumbprint, not both")
        if vcenter_ca_file is None and vcenter_thumbprint is None and ask.interactive:
            answer = ask.optional(
                "CA file of vCenter's certificate (empty: the system's trust store)"
            )
            vcenter_ca_file = Path(answer) if answer else None
        the_bucket = ask("S3 bucket", bucket, "--bucket")
        the_region = ask("AWS region", region, "--region", default="us-east-1")
        if endpoint_url is None and ask.interactive:
            endpoint_url = ask.optional("S3 endpoint URL (empty: AWS)") or None
        if s3_ca_file is None and ask.interactive:
            answer = ask.optional("CA file of the S3 endpoint (empty: the system's trust store)")
            s3_ca_file = Path(answer) if answer else None
        if access_key_id is None and secret_key is None and ask.interactive:
            access_key_id = ask.optional("AWS access key id (empty: the AWS credential chain)")
            access_key_id = access_key_id or None
        if access_key_id is not None and secret_key is None:
            secret_key = ask(f"AWS secret access key, as {SECRET_FORMS}", None, "--secret-key")
        if (access_key_id is None) != (secret_key is None):
            raise InvalidInputError("give --access-key-id and --secret-key together, or neither")
        if sse not in ("AES256", "aws:kms"):
            raise InvalidInputError(f"--sse {sse!r}: give AES256 or aws:kms")
        if sse == "aws:kms" and not kms_key_id:
            raise InvalidInputError("--sse aws:kms needs --kms-key-id")
        folder = (
            Path(
                ask(
                    "state folder",
                    str(state_dir) if state_dir else None,
                    "--state-dir",
                    default=str(DEFAULT_STATE_DIR),
                )
            )
            .expanduser()
            .absolute()
        )
        settings = InitSettings(
            vcenter=url,
            user=user,
            password=password,
            bucket=the_bucket,
            region=the_region,
            state_dir=folder,
            ca_file=_absolute(vcenter_ca_file),
            thumbprint=vcenter_thumbprint,
            prefix=prefix,
            endpoint_url=endpoint_url,
            s3_ca_file=_absolute(s3_ca_file),
            access_key_id=access_key_id,
            secret_key=parse_secret_ref(secret_key, "--secret-key") if secret_key else None,
            sse=sse,
            kms_key_id=kms_key_id,
        )
        replaced = path.exists()
        write_config_file(path, render_config(settings), force)
        made = make_state_dir(folder)
        from connector.config import load_config

        cfg = load_config(path)
        AuditLog(cfg.audit_path).record(
            "config.init",
            str(path),
            SUCCESS,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            replaced=replaced,
        )
    except (InvalidInputError, ConfigError, PermanentError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    out.print(f"wrote {escape(str(path))} (no secrets in it)", highlight=False)
    out.print(f"state folder {escape(str(folder))} ({made})", highlight=False)
    for ref, what in ((password, "vCenter password"), (settings.secret_key, "AWS secret key")):
        if ref is not None and ref.kind == "file" and not Path(ref.value).is_file():
            out.print(
                f"note: the {what} file {escape(ref.value)} does not exist yet; create it "
                "with mode 0600",
                highlight=False,
            )
    if no_check:
        out.print(f"next: connector --config {escape(str(path))} check", highlight=False)
        return
    out.print("running connector check:", highlight=False)
    from connector.check import run_checks

    failures = run_with_app(path, lambda a: print_checks(run_checks(a), as_json=False))
    if failures:
        out.print(
            "the config is written; fix what failed and run `connector check` again",
            highlight=False,
        )
        raise typer.Exit(1)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().absolute()


class _Asker:
    """A flag's value, else an answer typed in the terminal, else an error naming the flag."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive

    def __call__(
        self, question: str, given: str | None, flag: str, default: str | None = None
    ) -> str:
        if given is not None and given.strip():
            return given.strip()
        if not self.interactive:
            if default is not None:
                return default
            raise InvalidInputError(
                f"{flag} is needed (not in a terminal, so nothing can be asked); "
                "see `connector init --help`"
            )
        while True:
            answer: str = typer.prompt(question, default=default, show_default=default is not None)
            if answer.strip():
                return answer.strip()

    def optional(self, question: str) -> str:
        answer: str = typer.prompt(question, default="", show_default=False)
        return answer.strip()


def write_config_file(path: Path, text: str, force: bool) -> None:
    """Write the config (mode 0644: it holds no secret) atomically; keep an old one as .bak."""
    load_check = path.with_name(f".{path.name}.new")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(load_check, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        from connector.config import load_config

        load_config(load_check)  # what init writes must load
    except ConfigError:
        load_check.unlink(missing_ok=True)
        raise
    if path.exists() and force:
        os.replace(path, path.with_name(path.name + ".bak"))
    os.replace(load_check, path)


def make_state_dir(folder: Path) -> str:
    """Create the state folder with mode 0700, or tighten an existing one to it."""
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"the state folder {folder} exists and is not a folder")
    if folder.is_dir():
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            folder.chmod(0o700)
            return f"existed with mode {mode:04o}, now 0700"
        return "existed, mode 0700"
    folder.mkdir(parents=True, mode=0o700)
    folder.chmod(0o700)  # mkdir's mode is cut by the umask
    return "created, mode 0700"
