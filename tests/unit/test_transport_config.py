"""The transport is chosen in config and validated at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.app import local_specs
from connector.check import CheckResult, check_vddk, require_vddk
from connector.config import Config, load_config
from connector.errors import ConfigError

VCENTER = """
[vcenter]
url = "https://vc.example.com/sdk"
user = "svc"
password_file = "vc.password"
"""
S3 = """
[s3]
bucket = "replicas-1"
"""


def load(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "connector.toml"
    path.write_text(body)
    return load_config(path)


def refused(tmp_path: Path, body: str, *fragments: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, body)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_default_is_datastore_https(tmp_path):
    cfg = load(tmp_path, VCENTER + S3)
    assert cfg.transport.kind == "datastore-https" and cfg.transport.in_flight == 8


def test_vddk_needs_its_section_and_resolves_paths(tmp_path):
    refused(tmp_path, VCENTER + S3 + '[transport]\nkind = "vddk"\n', "[transport.vddk]", "libdir")
    cfg = load(
        tmp_path,
        VCENTER
        + S3
        + '[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = "vddk"\n'
        + 'transports = "hotadd:nbdssl"\nconfig_file = "vddk.conf"\n',
    )
    assert cfg.transport.vddk is not None
    assert cfg.transport.vddk.libdir == tmp_path / "vddk"
    assert cfg.transport.vddk.config_file == tmp_path / "vddk.conf"
    assert cfg.transport.vddk.transports == ("hotadd", "nbdssl")


def test_vddk_refuses_plain_nbd_and_sha256_thumbprints(tmp_path):
    base = VCENTER + S3 + '[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = "/opt/v"\n'
    refused(tmp_path, base + 'transports = ["nbd", "nbdssl"]\n', "unencrypted", "nbdssl")
    refused(tmp_path, base + f'thumbprint = "{":".join(["AB"] * 32)}"\n', "SHA-1")
    cfg = load(tmp_path, base + f'thumbprint = "{":".join(["ab"] * 20)}"\n')
    assert cfg.transport.vddk is not None
    assert cfg.transport.vddk.thumbprint == ":".join(["AB"] * 20)
    refused(
        tmp_path,
        VCENTER + S3 + '[transport.vddk]\nlibdir = "/opt/v"\n',
        "used only with [transport] kind = 'vddk'",
    )


def test_vcenter_transports_need_vcenter(tmp_path):
    refused(tmp_path, S3, "reads from vCenter: add [vcenter]")
    refused(tmp_path, S3 + '[transport]\nkind = "vddk"\n', "reads from vCenter")


LOCAL_VM = """
[[local.vms]]
name = "kvm-web"
quiescent = true
[[local.vms.disks]]
path = "images/web.img"
[[local.vms.disks]]
path = "/dev/vg0/web-data"
key = 3000
"""


def test_local_transport_reads_local_vms_without_vcenter(tmp_path):
    cfg = load(tmp_path, S3 + '[transport]\nkind = "local"\n' + LOCAL_VM)
    assert cfg.vcenter is None
    (vm,) = local_specs(cfg)
    assert vm.name == "kvm-web" and vm.quiescent
    assert [(d.key, d.path) for d in vm.disks] == [
        (2000, tmp_path / "images" / "web.img"),
        (3000, Path("/dev/vg0/web-data")),
    ]
    assert local_specs(cfg)[0].uuid == vm.uuid  # stable across loads
    with pytest.raises(ConfigError, match="has no \\[vcenter\\]"):
        cfg.require_vcenter()


def test_local_and_nbd_transports_are_checked_against_the_disks(tmp_path):
    refused(tmp_path, S3 + '[transport]\nkind = "local"\n', "at least one [[local.vms]]")
    refused(
        tmp_path,
        S3 + '[transport]\nkind = "nbd"\n' + LOCAL_VM,
        "local VM 'kvm-web' disk 1",
        "its 'nbd'",
    )
    refused(tmp_path, VCENTER + S3 + LOCAL_VM, "[local] vms are read only by")
    nbd_vm = """
[[local.vms]]
name = "kvm-db"
snapshot_command = ["/usr/local/sbin/snap"]
[[local.vms.disks]]
nbd = "nbd+unix:///vda?socket=/run/db.sock"
"""
    cfg = load(tmp_path, S3 + '[transport]\nkind = "nbd"\n' + nbd_vm)
    (vm,) = local_specs(cfg)
    assert vm.snapshot_command == ("/usr/local/sbin/snap",)
    (disk,) = vm.disks
    assert disk.nbd is not None and disk.nbd.socket_path == "/run/db.sock"
    assert disk.nbd.export == "vda"


@pytest.mark.parametrize(
    ("disk", "fragment"),
    [
        ('path = "/a"\nnbd = "nbd+unix:///?socket=/s"', "either path"),
        ("label = 'x'", "either path"),
        ('nbd = "nbd://10.0.0.5/x"', "without TLS"),
        ('nbd = "nbd+unix:///?socket=/s"\nsnapshot_path = "/b"', "snapshot_path goes with path"),
    ],
)
def test_bad_local_disks_are_refused(tmp_path, disk, fragment):
    body = (
        S3
        + '[transport]\nkind = "nbd"\n[[local.vms]]\nname = "v"\nquiescent = true\n'
        + f"[[local.vms.disks]]\n{disk}\n"
    )
    refused(tmp_path, body, fragment)


def test_local_vm_needs_a_snapshot_or_quiescence_and_unique_names(tmp_path):
    vm = '[[local.vms]]\nname = "v"\n[[local.vms.disks]]\npath = "/a"\n'
    refused(tmp_path, S3 + '[transport]\nkind = "local"\n' + vm, "snapshot_command, or quiescent")
    twice = LOCAL_VM + LOCAL_VM
    refused(tmp_path, S3 + '[transport]\nkind = "local"\n' + twice, "two VMs with the same name")
    same_key = (
        '[[local.vms]]\nname = "v"\nquiescent = true\n'
        '[[local.vms.disks]]\npath = "/a"\n[[local.vms.disks]]\npath = "/b"\nkey = 2000\n'
    )
    refused(tmp_path, S3 + '[transport]\nkind = "local"\n' + same_key, "same key")


def vddk_part(result: CheckResult, part: str) -> str:
    """`STATUS: DETAIL` of one part of the VDDK check, from its detail lines."""
    prefix = f"vddk: {part}: "
    (line,) = (d for d in result.details if d.startswith(prefix))
    return line.removeprefix(prefix)


def test_check_skips_vddk_for_other_transports(tmp_path):
    cfg = load(tmp_path, S3 + '[transport]\nkind = "local"\n' + LOCAL_VM)
    assert check_vddk(cfg) == CheckResult("skipped", "transport is 'local'")


def test_check_reports_missing_vddk(tmp_path):
    cfg = load(
        tmp_path,
        VCENTER + S3 + '[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = "no-vddk-here"\n',
    )
    result = check_vddk(cfg)
    library = vddk_part(result, "VDDK library")
    assert result.status == "failed" and library.startswith("fail: ")
    assert str(tmp_path / "no-vddk-here") in library and "not shipped" in library
    assert "vddk: VDDK library: VDDK is missing" in result.summary
    # a directory without the library is named as such
    (tmp_path / "no-vddk-here").mkdir()
    assert "holds no lib64/libvixDiskLib.so*" in vddk_part(check_vddk(cfg), "VDDK library")
    # with the library present (an empty stand-in), that check passes
    (tmp_path / "no-vddk-here" / "lib64").mkdir()
    (tmp_path / "no-vddk-here" / "lib64" / "libvixDiskLib.so.8").touch()
    assert vddk_part(check_vddk(cfg), "VDDK library").startswith("ok: ")


MISSING_NBDKIT = (
    VCENTER
    + S3
    + '[transport]\nkind = "vddk"\n[transport.vddk]\nlibdir = "/opt/v"\n'
    + 'nbdkit = "/nonexistent/nbdkit"\n'
)


def test_check_reports_a_missing_nbdkit(tmp_path):
    result = check_vddk(load(tmp_path, MISSING_NBDKIT))
    (line,) = result.details
    assert result.status == "failed" and "apt-get install nbdkit" in result.summary
    assert line.startswith("vddk: nbdkit: fail: ")


def test_a_broken_vddk_setup_is_refused_naming_what_is_missing(tmp_path):
    with pytest.raises(ConfigError) as refused:
        require_vddk(load(tmp_path, MISSING_NBDKIT))
    message = str(refused.value)
    assert message.startswith("the vddk transport cannot run: vddk: nbdkit: ")
    assert message.endswith(" (see `connector check` and docs/transports.md)")
