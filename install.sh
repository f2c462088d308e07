#!/usr/bin/env bash
# Install rblguard on Debian 12 as a Debian package and run it, as root:  ./install.sh
#
#  - Debian's build tools (this checkout's debian/control Build-Depends), then the
#    package rblguard_*.deb built from this checkout in a temporary copy
#  - `apt-get install` of that package: its Depends come from Debian, nothing from PyPI;
#    the package enables and starts rblguard.service (docs/install.md says what goes where)
#  - an installation by an earlier install.sh (/opt/rblguard, /usr/local/sbin/rblguard,
#    /etc/systemd/system/rblguard.service) is removed first; its config and state stay
#  - without systemd (a container), the daemon then runs in the foreground.
# Options: --no-start (install only: nothing is started, by systemd or here).
set -euo pipefail
cd "$(dirname "$0")"
start=1
[ "${1:-}" = "--no-start" ] && start=0

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root" >&2
    exit 2
fi

# A python3 of pyenv, conda or a venv first on PATH would build against the wrong
# interpreter: pybuild must see Debian's own.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive
systemd_up=0
[ -d /run/systemd/system ] && systemd_up=1

# Debian's policy-rc.d (exit 101: "not allowed") keeps the package from starting the
# service; only one we made ourselves is removed again.
policy=/usr/sbin/policy-rc.d
own_policy=0
cleanup() {
    if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
    if [ -n "${build:-}" ]; then rm -rf "$build"; fi
}
trap cleanup EXIT
if [ "$start" = 0 ] && [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
fi

apt-get update -qq
apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
apt-get build-dep -y -qq ./ >/dev/null

# Built in a copy: dpkg-buildpackage writes ../*.deb and leaves debian/ build trees.
build=$(mktemp -d)
chmod 755 "$build"  # apt reads the .deb as its unprivileged _apt user
mkdir "$build/src"
tar --exclude=./.git --exclude=./.venv --exclude="*.egg-info" --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$build/src" -xf -
(cd "$build/src" && dpkg-buildpackage -us -uc -b >"$build/build.log" 2>&1) || {
    tail -40 "$build/build.log" >&2
    echo "install.sh: the package did not build" >&2
    exit 1
}

# The earlier install.sh's unit in /etc/systemd/system would shadow the package's.
old_unit=/etc/systemd/system/rblguard.service
if [ -e "$old_unit" ] && grep -q /usr/local/sbin/rblguard "$old_unit"; then
    if [ "$systemd_up" = 1 ]; then
        systemctl disable --now rblguard.service || true
    fi
    rm -f "$old_unit" /etc/systemd/system/multi-user.target.wants/rblguard.service
    if [ "$systemd_up" = 1 ]; then systemctl daemon-reload; fi
fi
if [ -L /usr/local/sbin/rblguard ] \
        && [ "$(readlink /usr/local/sbin/rblguard)" = /opt/rblguard/bin/rblguard ]; then
    rm -f /usr/local/sbin/rblguard
fi
rm -rf /opt/rblguard

# An existing /etc/rblguard/rblguard.yaml (yours) is kept; the default arrives beside
# it as rblguard.yaml.dpkg-dist.
apt-get install -y -qq -o Dpkg::Options::=--force-confdef \
    -o Dpkg::Options::=--force-confold "$build"/rblguard_*.deb >/dev/null

/usr/bin/rblguard run --check

[ "$start" = 1 ] || exit 0
if [ "$systemd_up" = 1 ]; then
    systemctl --no-pager status rblguard.service || true
else
    echo "install.sh: no systemd here; running rblguard in the foreground (Ctrl-C stops it)"
    cleanup
    trap - EXIT
    exec /usr/bin/rblguard run
fi
