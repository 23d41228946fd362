"""The nbdkit command line of the vddk transport, exactly as docs/transports.md shows it."""

from __future__ import annotations

import re
import shlex
from dataclasses import replace
from pathlib import Path

from connector.adapters.vddk import VddkParams, vddk_command

DOCS = Path(__file__).resolve().parents[2] / "docs" / "transports.md"
DOC_PARAMS = VddkParams(
    libdir=Path("/opt/vmware-vix-disklib-distrib"),
    server="vcenter.example.com",
    user="svc-connector@vsphere.local",
    thumbprint="B2:31:BD:DE:9F:DB:9D:E0:78:EF:30:42:8A:41:B0:28:92:93:C8:DD",
)
DOC_SOCKET = Path("/var/lib/connector/nbd/nbdkit-k3j9x2/nbd.sock")
DOC_PASSWORD_FILE = Path("/etc/connector/vcenter.password")


def documented_command() -> list[str]:
    text = DOCS.read_text(encoding="utf-8")
    block = re.search(
        r"<!-- vddk-command: begin -->\s*```sh\n(.*?)```\s*<!-- vddk-command: end -->",
        text,
        re.S,
    )
    assert block is not None, "docs/transports.md lost its vddk command block"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_vddk_command_is_exactly_as_documented() -> None:
    argv = vddk_command(
        DOC_PARAMS,
        "vm-42",
        "snapshot-97",
        "[datastore1] web-01/web-01.vmdk",
        DOC_SOCKET,
        DOC_PASSWORD_FILE,
    )
    assert argv == documented_command()
    assert argv[:9] == [
        "nbdkit",
        "--exit-with-parent",
        "--readonly",
        "--foreground",
        "--unix",
        str(DOC_SOCKET),
        "--pidfile",
        str(DOC_SOCKET.with_name("nbdkit.pid")),
        "vddk",
    ]
    assert [a for a in argv if a.startswith("password=")] == [f"password=+{DOC_PASSWORD_FILE}"]


def test_vddk_command_optional_parameters() -> None:
    params = replace(
        DOC_PARAMS,
        port=8443,
        transports=("nbdssl",),
        config_file=Path("/etc/connector/vddk.conf"),
        nbdkit="/usr/local/bin/nbdkit",
    )
    argv = vddk_command(params, "vm-1", "snapshot-2", "[ds] a/a.vmdk", DOC_SOCKET, Path("/pw"))
    assert argv[0] == "/usr/local/bin/nbdkit"
    assert argv[argv.index("vddk") + 1 :] == [
        "libdir=/opt/vmware-vix-disklib-distrib",
        "server=vcenter.example.com",
        "port=8443",
        f"thumbprint={DOC_PARAMS.thumbprint}",
        "user=svc-connector@vsphere.local",
        "password=+/pw",
        "vm=moref=vm-1",
        "snapshot=snapshot-2",
        "transports=nbdssl",
        "config=/etc/connector/vddk.conf",
        "file=[ds] a/a.vmdk",
    ]
    assert "port=443" not in vddk_command(
        replace(DOC_PARAMS, port=443), "v", "s", "f", DOC_SOCKET, Path("/pw")
    )
