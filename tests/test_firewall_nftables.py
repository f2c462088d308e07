# ruff: noqa: F811 - test functions take the imported "pair" fixture by name
"""The nftables backend against the real kernel, with real packets between namespaces.

Same harness as the ipset tests (a backend run inside the server namespace, probes from
the client namespace): a banned source's SYN is dropped, everything else still works,
and a blocked connection is counted once however often its SYN is retransmitted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from tests.daemon_harness import wait_for
from tests.netns import NetnsPair, require_root_tools, run
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
    assert overlap["failed"][0][2] == "overlap"
    listed = results[4]
    assert listed["198.18.1.21"] > 30 and listed["198.18.2.0/24"] > 30  # refreshed
    assert listed["198.18.1.20"] <= 2
    wait_for(lambda: not {"198.18.1.20", BANNED6} & set(ops(pair, [["list", None]])[0]), 10,
             "the kernel to expire the 2 s elements", every=0.2)
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


# Runs in a namespace of its own: 200,000 bans, then how long health() and counters()
# take (each several times) against one full listing, and what health() says after
# damage.  Prints JSON.
SCALE = r"""
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from rblguard.firewall.base import Entry, FirewallOptions
from rblguard.firewall.nftables import NftablesBackend
b = NftablesBackend(FirewallOptions())
b.ensure()
n = int(sys.argv[2])
entries = [Entry(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 3600) for i in range(n // 2)]
entries += [Entry(f"2001:db8:{i >> 16:x}:{i & 0xffff:x}::1", 3600) for i in range(n // 2)]
assert b.ban(entries).done == n
def timed(fn):
    times = []
    for _ in range(5):
        t = time.perf_counter(); value = fn(); times.append(time.perf_counter() - t)
    return max(times), value
health_s, health = timed(b.health)
counters_s, counters = timed(b.counters)
t = time.perf_counter(); listed = len(b.list()); list_s = time.perf_counter() - t
def nft(*args):
    subprocess.run(["nft", *args], check=True)
nft("flush", "chain", "inet", "rblguard", "ban6")
t = time.perf_counter(); lost_rules = b.health(); lost_rules_s = time.perf_counter() - t
nft("flush", "chain", "inet", "rblguard", "input")  # a set in use cannot be deleted
nft("delete", "set", "inet", "rblguard", "v6")
t = time.perf_counter(); lost_set = b.health(); lost_set_s = time.perf_counter() - t
nft("flush", "ruleset")
flushed = b.health()
print(json.dumps({
    "health_s": health_s, "counters_s": counters_s, "list_s": list_s, "listed": listed,
    "health": [health.ok, health.problems],
    "counters": {f: [c.packets, c.connections] for f, c in counters.items()},
    "lost_rules": lost_rules.problems, "lost_rules_s": lost_rules_s,
    "lost_set": lost_set.problems, "lost_set_s": lost_set_s,
    "flushed": flushed.problems, "flushed_counters":
        {f: [c.packets, c.connections] for f, c in b.counters().items()}}))
"""


def test_health_and_counters_do_not_read_200000_elements() -> None:
    """The daemon asks for health and counters every 5 s: with 200,000 bans each answer
    takes a few milliseconds (a full listing takes seconds), and still sees damage."""
    require_root_tools("nft")
    ns = f"rgn-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    try:
        proc = run(["ip", "netns", "exec", ns, sys.executable, "-c", SCALE,
                    str(Path(__file__).resolve().parents[1]), "200000"], timeout=300)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    r = json.loads(proc.stdout)
    print(f"200,000 elements: health {r['health_s'] * 1000:.1f} ms, counters "
          f"{r['counters_s'] * 1000:.1f} ms, full list {r['list_s']:.2f} s")
    assert r["listed"] == 200_000
    assert r["health"] == [True, []]
    assert r["counters"] == {"4": [0, 0], "6": [0, 0]}
    assert r["health_s"] < 0.25 and r["counters_s"] < 0.25  # the slowest of five each
    assert r["list_s"] > 5 * max(r["health_s"], r["counters_s"])
    assert r["lost_rules"] == ["chain ban6 has 0 rules, expected 3"]
    assert "set v6 is missing" in r["lost_set"]
    assert "chain input has 0 rules, expected 4" in r["lost_set"]
    assert max(r["lost_rules_s"], r["lost_set_s"]) < 0.25
    assert r["flushed"] == ["table inet rblguard is missing"]
    assert r["flushed_counters"] == {"4": [0, 0], "6": [0, 0]}


PATHS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from rblguard.firewall.base import Entry, FirewallError, FirewallOptions
from rblguard.firewall.nftables import NftablesBackend

def run(b):
    b.remove(); b.ensure()
    batch = [Entry(f"198.18.60.{i}", 600, False) for i in range(1, 201)]
    batch += [Entry("2001:db8:60::7", 600, False), Entry("198.18.61.0/24", 600, False),
              Entry("2001:db8:61::/64", 600, False), Entry("999.1.1.1", 600, False),
              Entry("01.2.3.4", 600), Entry("198.18.60.1 } ; flush ruleset", 600),
              Entry("2001:db8::zz", 600), Entry("198.18.61.9", 600, False)]
    first = b.ban(batch)
    second = b.ban([Entry("198.18.60.1", 3000), Entry("198.18.60.2", 5, False)])
    listed = {x.target: x.expires for x in b.list()}
    b._run(f"delete table {b.table}")
    try:
        b.ban([Entry("198.18.62.1", 60, False)])
        missing = None
    except FirewallError as exc:
        missing = str(exc)
    b.remove(); b.close()
    return {"done": first.done, "failed": sorted((f.target, f.reason) for f in first.failed),
            "second": second.done, "n": len(listed), "refreshed": listed.get("198.18.60.1"),
            "kept": listed.get("198.18.60.2"), "net": "198.18.61.0/24" in listed,
            "net6": "2001:db8:61::/64" in listed, "v6": "2001:db8:60::7" in listed,
            "missing": missing}

fast = NftablesBackend(FirewallOptions(backend="nftables"))
text = NftablesBackend(FirewallOptions(backend="nftables"))
text._elements = False  # as on a host where the nfnetlink socket cannot be opened
print(json.dumps({"netlink": run(fast), "text": run(text)}))
"""


def test_netlink_and_text_paths_ban_alike() -> None:
    """Single addresses go over nfnetlink, prefixes and a host without that socket
    through libnftables' text: the same elements land, bad text is refused as INVALID
    (never sent: no command can be smuggled in), a re-ban restarts the clock, the v4/v6
    single and prefix sets each get theirs; a missing table is raised (netlink path)."""
    require_root_tools("nft")
    ns = f"rgn-{uuid.uuid4().hex[:6]}"
    run(["ip", "netns", "add", ns])
    try:
        proc = run(["ip", "netns", "exec", ns, sys.executable, "-c", PATHS,
                    str(Path(__file__).resolve().parents[1])], timeout=120)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    r = json.loads(proc.stdout)
    for path in ("netlink", "text"):
        got = r[path]
        assert got["done"] == 204, (path, got)
        assert got["failed"] == [["01.2.3.4", "invalid"],
                                 ["198.18.60.1 } ; flush ruleset", "invalid"],
                                 ["2001:db8::zz", "invalid"], ["999.1.1.1", "invalid"]], path
        assert got["second"] == 2 and got["n"] == 204, (path, got)
        assert 2900 < got["refreshed"] <= 3000, (path, got)  # expires: clock restarted
        assert got["net"] and got["net6"] and got["v6"], (path, got)
    # an add without expires of an element already there: whatever this kernel makes of
    # it (6.x takes the new timeout), both paths send the same message
    assert abs(r["netlink"]["kept"] - r["text"]["kept"]) < 2
    assert "table or set missing" in r["netlink"]["missing"]
