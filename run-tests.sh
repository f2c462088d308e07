#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine, as root:  ./run-tests.sh
#
# It installs what the tests need (Debian's nftables, ipset, iptables, ucspi-tcp,
# daemontools, dnsmasq, postfix, promtool, systemd-analyze, the packaging tools, lintian,
# piuparts; the Python packages in .venv), then runs ruff, lint-imports (the layers) and pytest.  Tests that need root, network namespaces or those tools run for
# real; under CI=true a missing one fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" != 0 ]; then
    echo "run-tests.sh: run as root (the tests build network namespaces and firewalls)" >&2
    exit 2
fi

APT_PACKAGES=(nftables ipset iptables iproute2 ucspi-tcp daemontools dnsmasq-base
              postfix  # tests/e2e/test_postfix.py: the Postfix pack on a real Postfix
              prometheus systemd python3 python3-venv python3-pip
              python3-dev gcc  # pip install -e builds the compiled prefilter
              e2fsprogs util-linux mount  # a loop-device ext4 for the read-only state test
              # tests/test_package.py: build (debian/control's Build-Depends), check,
              # install (the package's Depends) and piuparts
              dpkg-dev build-essential debhelper dh-python pybuild-plugin-pyproject
              python3-all python3-all-dev python3-setuptools python3-argparse-manpage lintian
              piuparts debootstrap python3-yaml python3-watchdog
              python3-prometheus-client python3-pyroute2 python3-nftables python3-regex
              python3-redis
              redis-server openssl)  # the fleet tests' own hubs and their TLS certificates
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    # Debian's prometheus, dnsmasq, redis-server and postfix packages would start their
    # services on install; the tests run their own, in namespaces.  policy-rc.d (exit
    # 101: "not allowed") is Debian's way to keep a package from starting one; only ours
    # is removed after.  Postfix gets "No configuration": the tests write their own.
    # (Installing postfix replaces another MTA package, as on any Debian machine.)
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
    fi
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ "$own_policy" = 1 ] && rm -f "$policy"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/python -m ruff check .
.venv/bin/lint-imports --no-cache  # the layers in pyproject.toml
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
