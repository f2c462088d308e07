# ruff: noqa: F811 - test functions take the imported "pair" fixture by name
"""The nftables backend against the real kernel, with real packets between namespaces.

Same harness as the ipset tests (a backend run inside the server namespace, probes from
the client namespace): a banned source's SYN is dropped, everything else still works,
and a blocked connection is counted once however often its SYN is retransmitted.
"""

from __future__ import annotations

import subprocess
import sys
import time

from tests.netns import NetnsPair
from tests.test_firewall_ipset import (
    BANNED4,
    BANNED6,
    HELD,
    NET4_IN,
    NET4_OUT,
    NET6_IN,
    NET6_OUT,
    OTHER4,
    OTHER6,
    backend_ops,
    pair,  # noqa: F401 - the fixture
    probe,
    server_of,
)


def nft(pair: NetnsPair, *args: str) -> str:
    return pair.exec(pair.server, ["nft", *args]).stdout


def ops(pair: NetnsPair, steps: list, **options) -> list:
    return backend_ops(pair, steps, backend="nftables", **options)


def test_drops_only_new_connections_of_banned_sources(pair: NetnsPair) -> None:
    ops(pair, [["ensure", None], ["ensure", None]])
    table = nft(pair, "list", "table", "inet", "rblguard")
    assert table.count("jump ban4") == 2 and table.count("jump ban6") == 2  # not doubled
    assert "ct state new" in table and "tcp dport { 25, 465, 587 }" in table
    held = pair.popen(pair.client, [sys.executable, "-c", HELD, BANNED4, pair.server4],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "one"
        [result] = ops(pair, [["ban", [[BANNED4, 60], [BANNED6, 60], ["198.18.2.0/24", 60],
                                       ["2001:db8:0:1::/64", 60]]]])
        assert result == {"done": 4, "failed": []}
        cases = [(BANNED4, 25, "timeout"), (OTHER4, 25, "ok"), (BANNED4, 8025, "ok"),
                 (BANNED6, 25, "timeout"), (OTHER6, 25, "ok"), (BANNED6, 8025, "ok"),
                 (NET4_IN, 25, "timeout"), (NET4_OUT, 25, "ok"),
                 (NET6_IN, 25, "timeout"), (NET6_OUT, 25, "ok")]
        got = probe(pair, [(s, server_of(pair, s), p) for s, p, _ in cases])
        assert got == [want for _, _, want in cases]
        held.stdin.write("go\n")  # the session opened before the ban completes
        held.stdin.flush()
        assert held.stdout.readline().strip() == "two"
    finally:
        held.kill()
        held.wait()


def test_blocked_connections_count_once_despite_retransmitted_syns(pair: NetnsPair) -> None:
    ops(pair, [["ensure", None], ["ban", [[BANNED4, 60], [BANNED6, 60]]]])
    # Three connects of 2.5 s each: every SYN is retransmitted after 1 s and 3 s.
    got = probe(pair, [(BANNED4, pair.server4, 25)] * 3 + [(BANNED6, pair.server6, 25)] * 2,
                timeout=2.5)
    assert got == ["timeout"] * 5
    [counters] = ops(pair, [["counters", None]])
    assert counters["4"][1] == 3 and counters["6"][1] == 2  # connections
    assert counters["4"][0] >= 6 and counters["6"][0] >= 4  # packets: SYNs and retries


def test_expiry_refresh_unban_and_overlap(pair: NetnsPair) -> None:
    results = ops(pair, [["ensure", None],
                         ["ban", [["198.18.1.20", 2], ["198.18.1.21", 2], [BANNED6, 2],
                                  ["198.18.2.0/24", 2]]],
                         ["ban", [["198.18.1.21", 60], ["198.18.2.0/24", 60]]],
                         ["ban", [["198.18.2.128/25", 60], ["198.18.9.9", 60]]],
                         ["list", None]])
    assert results[2] == {"done": 2, "failed": []}
    overlap = results[3]
    assert overlap["done"] == 1 and overlap["failed"][0][0] == "198.18.2.128/25"
    listed = results[4]
    assert listed["198.18.1.21"] > 30 and listed["198.18.2.0/24"] > 30  # refreshed
    assert listed["198.18.1.20"] <= 2
    time.sleep(2.5)
    [listed] = ops(pair, [["list", None]])
    assert "198.18.1.20" not in listed and BANNED6 not in listed
    assert probe(pair, [("198.18.1.20", pair.server4, 25), ("198.18.1.21", pair.server4, 25)]
                 ) == ["ok", "timeout"]
    [unban, listed] = ops(pair, [["unban", ["198.18.1.21", "203.0.113.7", "198.18.2.0/24",
                                            "2001:db8:5::/64", "198.18.1.21"]],
                                 ["list", None]])
    assert unban == {"done": 4, "failed": []}
    assert listed == {"198.18.9.9": listed["198.18.9.9"]}


def test_health_self_check_repair_and_remove(pair: NetnsPair) -> None:
    [health] = ops(pair, [["health", None]])
    assert not health["ok"] and "missing" in health["problems"][0]
    ops(pair, [["ensure", None], ["ban", [[BANNED4, 60]]]])
    nft(pair, "flush", "chain", "inet", "rblguard", "ban6")  # rules lost
    [health] = ops(pair, [["health", None]])
    assert health == {"ok": False, "problems": ["chain ban6 has 0 rules, expected 3"]}
    nft(pair, "flush", "chain", "inet", "rblguard", "input")  # a set cannot go while used
    nft(pair, "delete", "set", "inet", "rblguard", "v6net")
    [health] = ops(pair, [["health", None]])
    assert "set v6net is missing" in health["problems"]
    nft(pair, "flush", "ruleset")
    [health] = ops(pair, [["health", None]])
    assert health["problems"] == ["table inet rblguard is missing"]
    [_, health] = ops(pair, [["ensure", None], ["health", None]])
    assert health == {"ok": True, "problems": []}
    ops(pair, [["remove", None], ["remove", None]])
    assert nft(pair, "list", "ruleset").strip() == ""


def test_every_port_scope(pair: NetnsPair) -> None:
    ops(pair, [["ensure", None], ["ban", [[BANNED4, 60]]]], ports=None)
    assert probe(pair, [(BANNED4, pair.server4, 8025), (OTHER4, pair.server4, 8025)]) == \
        ["timeout", "ok"]
