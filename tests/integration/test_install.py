"""systemd/install.sh, the production install, into a staging root: a virtualenv
under /opt/connector from Debian's externally managed python3, /usr/bin/connector
linked to it, the folders with their modes, and the unit, which
`systemd-analyze verify` accepts with that /usr/bin/connector. Run again, it
upgrades in place."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from connector import __version__

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "systemd" / "install.sh"
SYSTEM_PYTHON = Path("/usr/bin/python3")


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), *args],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_into_a_root_gives_the_unit_its_connector(tmp_path: Path) -> None:
    assert SYSTEM_PYTHON.is_file(), "Debian's python3 is what the install uses"
    root = tmp_path / "root"
    proc = install(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "creating the virtualenv" in proc.stdout

    link = root / "usr" / "bin" / "connector"
    assert link.is_symlink()
    assert str(link.readlink()) == "../../opt/connector/venv/bin/connector"
    version = subprocess.run(
        [str(link), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0 and version.stdout.strip() == __version__
    cfg = (root / "opt" / "connector" / "venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg  # built from the system's Python, not into it

    assert mode(root / "etc" / "connector") == 0o750
    assert mode(root / "etc" / "connector" / "credentials") == 0o700
    assert mode(root / "var" / "lib" / "connector") == 0o700
    unit = root / "etc" / "systemd" / "system" / "connector.service"
    assert unit.read_text() == (REPO / "systemd" / "connector.service").read_text()
    assert (root / "usr" / "lib" / "sysusers.d" / "connector.conf").is_file()
    assert not (root / "etc" / "connector" / "connector.toml").exists()  # init writes it

    # systemd-analyze checks the unit in that root, /usr/bin/connector included; it
    # needs the system's own units (sysinit.target...) there too.
    shutil.copytree("/usr/lib/systemd/system", root / "usr" / "lib" / "systemd" / "system")
    verify = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/connector.service"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    link.unlink()  # the same check fails without the link
    broken = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/connector.service"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert broken.returncode != 0 and "/usr/bin/connector" in broken.stderr

    again = install(root)  # an upgrade: the same command again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "upgrading the connector" in again.stdout
    assert link.is_symlink() and link.resolve().is_file()


def test_install_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    bad = install(tmp_path / "r", "--bogus")
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    no_venv = install(tmp_path / "r", "--python", str(tmp_path / "no-python"))
    assert no_venv.returncode == 2 and "apt-get install python3-venv" in no_venv.stderr
    assert not (tmp_path / "r" / "opt").exists()
