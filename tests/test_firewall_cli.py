"""``rblguard firewall setup|status|remove`` run as an admin would, inside a namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import NetnsPair, netns_pair, require_root_tools
from tests.test_firewall_ipset import (
    BANNED4,
    BANNED6,
    EXTRA,
    LISTENER,
    OTHER4,
    ROOT,
    backend_ops,
    probe,
)

DEFAULTS = os.path.join(ROOT, "tests", "fixtures", "defaults.yaml")


def cli(ns: str | None, *words: str, config: str = DEFAULTS
        ) -> subprocess.CompletedProcess[str]:
    """``python -m rblguard firewall WORDS`` (in namespace ``ns``), from the source tree."""
    cmd = [sys.executable, "-m", "rblguard", "firewall", *words, "--config", config]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)


def status(ns: str, backend: str) -> tuple[int, dict]:
    proc = cli(ns, "status", "--backend", backend, "--json")
    return proc.returncode, json.loads(proc.stdout)


def test_config_error_exits_2_with_the_message(tmp_path: Path) -> None:
    bad = tmp_path / "rblguard.yaml"
    bad.write_text("backend:\n  mode: bogus\n")
    proc = cli(None, "status", config=str(bad))
    assert proc.returncode == 2
    assert "backend.mode" in proc.stderr and "bogus" in proc.stderr


def _dump(pair: NetnsPair, backend: str) -> str:
    if backend == "nftables":
        return pair.exec(pair.server, ["nft", "list", "ruleset"]).stdout
    return "".join(line for t in ("iptables-save", "ip6tables-save")
                   for line in pair.exec(pair.server, [t]).stdout.splitlines(True)
                   if not line.startswith("#"))  # comments carry the time


@pytest.mark.parametrize("backend", ["ipset", "nftables"])
def test_setup_twice_status_and_remove(backend: str) -> None:
    require_root_tools("ipset", "iptables", "ip6tables", "nft")
    if backend == "nftables" and not (Path(ROOT) / "rblguard/firewall/nftables.py").exists():
        pytest.skip("the nftables backend has not landed yet")
    with netns_pair("rgc") as pair:
        pair.add_client_addresses(EXTRA)
        listener = pair.popen(pair.server, [sys.executable, "-c", LISTENER],
                              stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "listening"
            dumps = []
            for _ in range(2):
                proc = cli(pair.server, "setup", "--backend", backend)
                assert proc.returncode == 0, proc.stderr
                dumps.append(_dump(pair, backend))
            assert dumps[0] == dumps[1]  # the second setup changed nothing
            dump = dumps[1]
            if backend == "ipset":
                assert dump.count("-A INPUT -j RBLGUARD") == 2  # once per family
                assert dump.count("--match-set rblguard4 src -j DROP") == 1
                assert dump.count("--match-set rblguard6 src -j DROP") == 1
            else:
                assert dump.count("table inet rblguard") == 1
            code, report = status(pair.server, backend)
            assert (code, report["healthy"], report["backend"]) == (0, True, backend)
            # ipset: the set headers' own count; nftables keeps none, and status never
            # reads every element (no daemon runs here to ask)
            counted = backend == "ipset"
            assert report["entries"] == ({"ipv4": 0, "ipv6": 0} if counted else None)
            assert report["entries_from"] == ("kernel" if counted else None)

            ops = [["ban", [[BANNED4, 60], [BANNED6, 60], ["198.18.9.0/24", 60]]]]
            [ban] = backend_ops(pair, ops, backend=backend)
            assert ban == {"done": 3, "failed": []}
            assert probe(pair, [(BANNED4, pair.server4, 25), (BANNED6, pair.server6, 25),
                                (OTHER4, pair.server4, 25)]) == ["timeout", "timeout", "ok"]
            code, report = status(pair.server, backend)
            assert code == 0
            assert report["entries"] == ({"ipv4": 2, "ipv6": 1} if counted else None)
            # one connection each, its SYN retransmitted once in the probe's 1.5 s
            for family in ("ipv4", "ipv6"):
                assert report["counters"][family]["connections"] == 1, report
                assert report["counters"][family]["packets"] >= 2, report
            text = cli(pair.server, "status", "--backend", backend)
            assert text.returncode == 0 and "healthy" in text.stdout
            assert ("ipv4: 2 entries" if counted else "entries not counted") in text.stdout

            proc = cli(pair.server, "remove", "--backend", backend)
            assert proc.returncode == 0, proc.stderr
            dump = _dump(pair, backend)
            assert "rblguard" not in dump.lower()
            assert pair.exec(pair.server, ["ipset", "list", "-n"]).stdout.strip() == ""
            code, report = status(pair.server, backend)
            assert code == 1 and not report["healthy"] and report["problems"]
        finally:
            listener.kill()
            listener.wait()


def test_set_only_setup_prints_the_admins_lines(tmp_path: Path) -> None:
    require_root_tools("ipset", "iptables")
    config = tmp_path / "rblguard.yaml"
    config.write_text("backend:\n  type: ipset\n  mode: set-only\n  ports: [25, 587]\n")
    with netns_pair("rgo") as pair:
        proc = cli(pair.server, "setup", config=str(config))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "?SECTION NEW" in out
        assert "DROP    net:+rblguard4    $FW    tcp    25,587" in out
        assert ("iptables -I INPUT -p tcp -m multiport --dports 25,587 -m conntrack "
                "--ctstate NEW -m set --match-set rblguard4 src -j DROP") in out
        assert "--match-set rblguard6 src" in out
        assert "RBLGUARD" not in pair.exec(pair.server, ["iptables-save"]).stdout
        assert pair.exec(pair.server, ["ipset", "list", "-n"]).stdout.split() == \
            ["rblguard4", "rblguard6"]
        proc = cli(pair.server, "status", config=str(config))
        assert proc.returncode == 0 and "?SECTION NEW" in proc.stdout
        assert cli(pair.server, "remove", config=str(config)).returncode == 0
        assert pair.exec(pair.server, ["ipset", "list", "-n"]).stdout.strip() == ""


def test_docs_show_the_lines_setup_prints() -> None:
    """docs/firewall.md quotes the set-only lines exactly, so it cannot drift from them."""
    from rblguard.commands.firewall import admin_lines
    from rblguard.firewall.base import FirewallOptions

    doc = (Path(ROOT) / "docs" / "firewall.md").read_text()
    lines = [ln for ln in admin_lines(FirewallOptions(backend="ipset", mode="set-only"))
             if not ln.startswith("#")]
    assert lines and all(ln in doc for ln in lines)
    assert "rblguard firewall" in doc and "--ctstate NEW" in doc


def test_nftables_status_takes_entries_from_the_running_daemon(harness, tmp_path: Path) -> None:
    """With a daemon on the config's control socket, its count of active bans stands in
    for the element count nftables does not keep."""
    from tests.daemon_harness import reject_message, wait_for
    from tests.multilog import Multilog

    harness.write_config()
    log = Multilog(tmp_path / "log")
    harness.start()
    try:
        log.write(reject_message("198.18.7.1") + reject_message("198.18.7.2")
                  + reject_message("2001:db8:7::1"))
        wait_for(lambda: len(harness.kernel_elements()) == 3, what="three bans")
        proc = cli(harness.ns, "status", "--json", config=str(harness.config_path))
    finally:
        log.close()
    report = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert report["entries"] == {"ipv4": 2, "ipv6": 1}
    assert report["entries_from"] == "daemon"
