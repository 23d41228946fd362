#!/usr/bin/env bash
# Install the connector for production on Debian 12 (or any systemd distribution),
# in one command, as root:
#
#   sudo systemd/install.sh
#
# Debian's Python is "externally managed" (PEP 668): `pip install` into it is
# refused. So the connector goes into its own virtualenv, /opt/connector/venv,
# built from the system's python3 (apt-get install python3-venv), and
# /usr/bin/connector links to it: the path the unit's ExecStart= runs. Also:
# the `connector` system user (sysusers.d), /etc/connector (0750) with
# /etc/connector/credentials (0700) for the secrets, /var/lib/connector (0700),
# and the unit in /etc/systemd/system. The config is never touched: write it
# with `connector init`. Run it again to upgrade (see docs/operations.md).
#
# Options:
#   --root DIR     install under DIR instead of / (a staging root, for tests):
#                  no user is created and systemctl is not called
#   --python PY    the Python to build the virtualenv from (default /usr/bin/python3)
#   --source SRC   what pip installs: this source tree (default), a wheel or an sdist
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="/"
python="/usr/bin/python3"
source="$(dirname "$here")"
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root="$2"; shift 2 ;;
    --python) python="$2"; shift 2 ;;
    --source) source="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
root="$(mkdir -p "$root" && cd "$root" && pwd)"
on_system=0
[ "$root" = "/" ] && on_system=1
prefix="${root%/}"

if [ "$on_system" = 1 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo $0), or give --root DIR" >&2
  exit 2
fi
if ! "$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "install.sh: $python cannot build a virtualenv, or is older than 3.11;" \
    "on Debian: apt-get install python3-venv" >&2
  exit 2
fi

venv="$prefix/opt/connector/venv"
if [ -x "$venv/bin/python" ]; then
  echo "upgrading the connector in $venv"
else
  echo "creating the virtualenv $venv"
  mkdir -p "$prefix/opt/connector"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "$source"

# The unit runs /usr/bin/connector; a relative link works in a staging root too.
install -d -m 0755 "$prefix/usr/bin"
ln -sfn ../../opt/connector/venv/bin/connector "$prefix/usr/bin/connector"

install -d -m 0755 "$prefix/usr/lib/sysusers.d" "$prefix/etc/systemd/system"
install -m 0644 "$here/connector.sysusers.conf" "$prefix/usr/lib/sysusers.d/connector.conf"
install -m 0644 "$here/connector.service" "$prefix/etc/systemd/system/connector.service"
install -d -m 0750 "$prefix/etc/connector"
install -d -m 0700 "$prefix/etc/connector/credentials"
install -d -m 0700 "$prefix/var/lib/connector"

if [ "$on_system" = 1 ]; then
  if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers /usr/lib/sysusers.d/connector.conf
  elif ! id connector >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/connector --shell /usr/sbin/nologin connector
  fi
  chown connector:connector /var/lib/connector
  chgrp connector /etc/connector
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
fi

version="$("$venv/bin/connector" --version)"
cat <<EOF
installed connector $version:
  $prefix/usr/bin/connector -> /opt/connector/venv/bin/connector
  $prefix/etc/systemd/system/connector.service
next:
  connector --credentials-dir /etc/connector/credentials init \\
    --vcenter-password credential:vcenter-password --state-dir /var/lib/connector ...
  (put each secret in /etc/connector/credentials/NAME first, mode 0600, as the
  unit's LoadCredential= lines name them)
  systemctl enable --now connector
EOF
