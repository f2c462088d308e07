#!/usr/bin/env bash
# Install rblguard on Debian 12 and run it with its defaults:  sudo ./install.sh
#
#  - Debian packages: nftables (and python3-nftables), ipset, iptables, python3-venv
#  - rblguard into /opt/rblguard (a venv that also sees Debian's python3-* packages),
#    the command at /usr/local/sbin/rblguard
#  - /etc/rblguard/rblguard.yaml (the commented example; an existing one is kept) and
#    /etc/rblguard/rules.d/ for your own rules
#  - the systemd unit, enabled and started; without systemd (a container), the daemon
#    runs in the foreground instead.
# Options: --no-start (install only).
set -euo pipefail
cd "$(dirname "$0")"
start=1
[ "${1:-}" = "--no-start" ] && start=0

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nftables python3-nftables ipset iptables \
    python3 python3-venv python3-pip python3-yaml python3-watchdog \
    python3-prometheus-client python3-pyroute2 >/dev/null

# Debian's own python3 and python3-* packages; pip only fills what they lack.
/usr/bin/python3 -m venv --system-site-packages /opt/rblguard
/opt/rblguard/bin/pip install -q --disable-pip-version-check .
install -d -m 0755 /usr/local/sbin
ln -sf /opt/rblguard/bin/rblguard /usr/local/sbin/rblguard

install -d -m 0755 /etc/rblguard /etc/rblguard/rules.d
[ -e /etc/rblguard/rblguard.yaml ] || install -m 0644 rblguard.example.yaml /etc/rblguard/rblguard.yaml
install -m 0644 systemd/rblguard.service /etc/systemd/system/rblguard.service

/usr/local/sbin/rblguard run --check

[ "$start" = 1 ] || exit 0
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now rblguard.service
    systemctl --no-pager status rblguard.service || true
else
    echo "install.sh: no systemd here; running rblguard in the foreground (Ctrl-C stops it)"
    exec /usr/local/sbin/rblguard run
fi
