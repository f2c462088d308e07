"""The ipset backend against the real kernel: real sets, real iptables, real packets.

Each test makes a namespace pair (tests/netns.py), runs the backend inside the server
namespace (a fresh python process per step, the way the daemon and CLI would run) and
connects from the client namespace: a banned source's SYN must be dropped (the connect
times out), an unbanned source, an out-of-scope port and a session opened before the
ban must keep working.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import wait_for
from tests.netns import NetnsPair, netns_pair, require_root_tools

ROOT = str(Path(__file__).resolve().parents[1])
PROBE_TIMEOUT = 1.5

# Runs inside the server namespace: builds a backend from options, applies ops, prints JSON.
RUNNER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from rblguard.firewall.base import Entry, FirewallError, FirewallOptions
opts = json.loads(sys.argv[2])
if opts.get("ports") is not None:
    opts["ports"] = tuple(opts["ports"])
options = FirewallOptions(**opts)
if options.backend == "ipset":
    from rblguard.firewall.ipset import IpsetBackend as cls
else:
    from rblguard.firewall import make_backend
    cls = make_backend
backend = cls(options)
out = []
for op, arg in json.loads(sys.argv[3]):
    try:
        if op == "ban":
            r = backend.ban([Entry(t, s) for t, s in arg])
            out.append({"done": r.done, "failed": r.failed})
        elif op == "unban":
            r = backend.unban(arg)
            out.append({"done": r.done, "failed": r.failed})
        elif op == "list":
            out.append({x.target: x.expires for x in backend.list()})
        elif op == "health":
            h = backend.health()
            out.append({"ok": h.ok, "problems": h.problems})
        elif op == "counters":
            out.append({f: [c.packets, c.connections] for f, c in backend.counters().items()})
        else:
            getattr(backend, op)()
            out.append(None)
    except FirewallError as exc:
        out.append({"error": str(exc)})
backend.close()
print(json.dumps(out))
"""

# Runs in the server namespace: echo server on [::]:25 and [::]:8025, IPv4 and IPv6.
LISTENER = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        f = conn.makefile("rwb", buffering=0)
        for line in f:
            f.write(line)
def accept(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
for p in (25, 8025):
    threading.Thread(target=accept, args=(p,), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

# Runs in the client namespace: connects from each source in parallel, one echo each.
PROBE = r"""
import json, socket, sys, threading
probes, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
res = [None] * len(probes)
def go(i, src, dst, port):
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0)); s.connect((dst, port)); s.sendall(b"hi\n")
        res[i] = "ok" if s.recv(16) == b"hi\n" else "bad echo"
    except (socket.timeout, TimeoutError):
        res[i] = "timeout"
    except OSError as e:
        res[i] = f"error {e}"
    finally:
        s.close()
ts = [threading.Thread(target=go, args=(i, *p)) for i, p in enumerate(probes)]
[t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps(res))
"""

# Runs in the client namespace: one session opened now, used again when told to.
HELD = r"""
import socket, sys
s = socket.create_connection((sys.argv[2], 25), timeout=5, source_address=(sys.argv[1], 0))
f = s.makefile("rwb", buffering=0)
f.write(b"one\n"); print(f.readline().decode().strip(), flush=True)
sys.stdin.readline()
f.write(b"two\n"); print(f.readline().decode().strip(), flush=True)
"""

BANNED4, OTHER4 = "198.18.1.10", "198.18.1.11"
BANNED6, OTHER6 = "2001:db8::10", "2001:db8::11"
NET4_IN, NET4_OUT = "198.18.2.5", "198.18.3.5"
NET6_IN, NET6_OUT = "2001:db8:0:1::5", "2001:db8:0:2::5"
EXTRA = [BANNED4, OTHER4, BANNED6, OTHER6, NET4_IN, NET4_OUT, NET6_IN, NET6_OUT,
         "198.18.1.20", "198.18.1.21"]


def backend_ops(pair: NetnsPair, ops: list, **options) -> list:
    """Run ``ops`` against a backend built inside the server namespace; their results."""
    options.setdefault("backend", "ipset")
    proc = pair.exec(pair.server, [sys.executable, "-c", RUNNER, ROOT, json.dumps(options),
                                   json.dumps(ops)])
    return json.loads(proc.stdout)


def probe(pair: NetnsPair, probes: list[tuple[str, str, int]],
          timeout: float = PROBE_TIMEOUT) -> list[str]:
    """Connect from each (source, destination, port) at once; "ok" or "timeout" each."""
    proc = pair.exec(pair.client, [sys.executable, "-c", PROBE, json.dumps(probes),
                                   str(timeout)])
    return json.loads(proc.stdout)


def server_of(pair: NetnsPair, src: str) -> str:
    return pair.server6 if ":" in src else pair.server4


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    """A namespace pair with extra client addresses and the echo listener running."""
    require_root_tools("ipset", "iptables", "ip6tables")
    with netns_pair("rgi") as p:
        p.add_client_addresses(EXTRA)
        listener = p.popen(p.server, [sys.executable, "-c", LISTENER],
                           stdout=subprocess.PIPE, text=True)
        try:
            assert listener.stdout.readline().strip() == "listening"
            yield p
        finally:
            listener.kill()
            listener.wait()


def rule_lines(pair: NetnsPair, tool: str, chain: str) -> list[str]:
    return pair.exec(pair.server, [tool, "-S", chain]).stdout.splitlines()


def test_rules_mode_drops_new_connections_of_banned_sources_only(pair: NetnsPair) -> None:
    backend_ops(pair, [["ensure", None], ["ensure", None]])
    for tool in ("iptables", "ip6tables"):
        assert [ln for ln in rule_lines(pair, tool, "INPUT") if "RBLGUARD" in ln] == \
            ["-A INPUT -j RBLGUARD"]
        rules = [ln for ln in rule_lines(pair, tool, "RBLGUARD") if ln.startswith("-A")]
        assert len(rules) == 3  # retransmit drop, remember, connection drop
        assert all("--dports 25,465,587" in r and "--ctstate NEW" in r for r in rules)
        family = "6" if tool == "ip6tables" else "4"
        assert f"--match-set rblguard{family}-seen src,src -j DROP" in rules[0]
        assert rules[1].endswith(f"-j SET --add-set rblguard{family}-seen src,src")
        assert rules[2].endswith(f"--match-set rblguard{family} src -j DROP")
    held = pair.popen(pair.client, [sys.executable, "-c", HELD, BANNED4, pair.server4],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "one"
        [result] = backend_ops(pair, [["ban", [[BANNED4, 60], [BANNED6, 60],
                                               ["198.18.2.0/24", 60],
                                               ["2001:db8:0:1::/64", 60]]]])
        assert result == {"done": 4, "failed": []}
        cases = [(BANNED4, 25, "timeout"), (OTHER4, 25, "ok"), (BANNED4, 8025, "ok"),
                 (BANNED6, 25, "timeout"), (OTHER6, 25, "ok"), (BANNED6, 8025, "ok"),
                 (NET4_IN, 25, "timeout"), (NET4_OUT, 25, "ok"),
                 (NET6_IN, 25, "timeout"), (NET6_OUT, 25, "ok")]
        got = probe(pair, [(s, server_of(pair, s), p) for s, p, _ in cases])
        assert got == [want for _, _, want in cases]
        # The session opened before the ban still completes its exchange.
        held.stdin.write("go\n")
        held.stdin.flush()
        assert held.stdout.readline().strip() == "two"
    finally:
        held.kill()
        held.wait()
    [counters, unban, listed] = backend_ops(
        pair, [["counters", None], ["unban", [BANNED4, "198.18.77.7", "2001:db8:0:1::/64"]],
               ["list", None]])
    # connections: v4 BANNED4 and the /24's, v6 BANNED6 and the /64's; each probe waited
    # 1.5 s, long enough for one retransmitted SYN, which is a packet, not a connection
    assert counters["4"][1] == 2 and counters["6"][1] == 2
    assert counters["4"][0] >= 4 and counters["6"][0] >= 4
    assert unban == {"done": 3, "failed": []}
    assert sorted(listed) == sorted([BANNED6, "198.18.2.0/24"])
    assert probe(pair, [(BANNED4, pair.server4, 25), (NET6_IN, pair.server6, 25)]) == \
        ["ok", "ok"]


def test_expiry_refresh_and_big_batches(pair: NetnsPair) -> None:
    """2 s bans expire by themselves; a re-ban refreshes, by netlink and by restore."""
    filler = [[f"198.19.{i // 250}.{i % 250 + 1}", 60] for i in range(40)]
    ops = [["ensure", None],
           ["ban", [["198.18.1.20", 2], ["198.18.1.21", 2], [BANNED6, 2]]],
           ["ban", [["198.18.1.21", 60]]],  # small batch: netlink refresh
           ["ban", [[BANNED6, 60], *filler]],  # big batch: restore refresh
           ["list", None]]
    results = backend_ops(pair, ops)
    assert results[1] == {"done": 3, "failed": []}
    assert results[3] == {"done": 41, "failed": []}
    listed = results[4]
    assert listed["198.18.1.20"] <= 2 and listed["198.18.1.21"] > 30
    assert listed[BANNED6] > 30 and len(listed) == 43
    wait_for(lambda: "198.18.1.20" not in backend_ops(pair, [["list", None]])[0], 10,
             "the kernel to expire the 2 s element", every=0.2)
    [listed] = backend_ops(pair, [["list", None]])
    assert "198.18.1.20" not in listed and "198.18.1.21" in listed
    got = probe(pair, [("198.18.1.20", pair.server4, 25), ("198.18.1.21", pair.server4, 25),
                       (BANNED6, pair.server6, 25)])
    assert got == ["ok", "timeout", "timeout"]
    # Unban in one restore batch, absent addresses included, leaves the set empty.
    [unban, listed] = backend_ops(
        pair, [["unban", ["198.18.1.21", BANNED6, "198.18.1.20", "2001:db8::99",
                          *[t for t, _ in filler]]], ["list", None]])
    assert unban == {"done": 44, "failed": []} and listed == {}


@pytest.mark.parametrize("count", [12, 30], ids=["netlink", "restore"])
def test_full_set_refuses_the_rest_without_crashing(pair: NetnsPair, count: int) -> None:
    entries = [[f"198.18.5.{i}", 60] for i in range(1, count + 1)]
    results = backend_ops(pair, [["ensure", None], ["ban", entries], ["list", None],
                                 ["ban", entries[:8]], ["health", None]], maxelem=8)
    ban, listed, reban, health = results[1:]
    assert ban["done"] == 8 and len(ban["failed"]) == count - 8
    assert {t for t, _, _ in ban["failed"]} == {t for t, _ in entries[8:]}
    assert all("set is full" in why and f"{count - 8} entries" in why and reason == "set_full"
               for _, why, reason in ban["failed"])
    assert sorted(listed) == sorted(t for t, _ in entries[:8])
    assert reban == {"done": 8, "failed": []}  # refreshes still work in a full set
    assert health["ok"]


def test_health_notices_damage_and_ensure_repairs_it(pair: NetnsPair) -> None:
    [health] = backend_ops(pair, [["health", None]])
    assert not health["ok"]
    backend_ops(pair, [["ensure", None], ["ban", [[BANNED4, 60]]]])
    pair.exec(pair.server, ["ip6tables", "-F", "RBLGUARD"])  # flushed chain
    pair.exec(pair.server, ["ipset", "destroy", "rblguard6"])  # deleted set
    pair.exec(pair.server, ["ipset", "destroy", "rblguard6-seen"])  # and its seen set
    pair.exec(pair.server, ["iptables", "-D", "INPUT", "-j", "RBLGUARD"])  # lost jump
    [health] = backend_ops(pair, [["health", None]])
    assert not health["ok"]
    text = "\n".join(health["problems"])
    assert "rblguard6 is missing" in text and "ip6tables: rule missing in RBLGUARD" in text
    assert "ipset rblguard6-seen is missing" in text
    assert "iptables: INPUT does not jump to RBLGUARD" in text
    assert "rblguard4" not in text and "iptables: rule missing" not in text
    [_, health, listed] = backend_ops(pair, [["ensure", None], ["health", None],
                                             ["list", None]])
    assert health == {"ok": True, "problems": []}
    assert list(listed) == [BANNED4]  # repair kept the elements that were there
    assert len([x for x in rule_lines(pair, "iptables", "RBLGUARD") if "-A" in x]) == 3
    backend_ops(pair, [["remove", None], ["remove", None]])
    for tool in ("iptables", "ip6tables"):
        dump = pair.exec(pair.server, [f"{tool}-save"]).stdout
        assert "RBLGUARD" not in dump
    assert pair.exec(pair.server, ["ipset", "list", "-n"]).stdout.strip() == ""


def test_every_port_and_set_only_mode(pair: NetnsPair) -> None:
    """ports None: every TCP port.  set-only: no rules of ours; the admin's rule drops."""
    backend_ops(pair, [["ensure", None], ["ban", [[BANNED4, 60]]]], ports=None)
    assert probe(pair, [(BANNED4, pair.server4, 8025), (OTHER4, pair.server4, 8025)]) == \
        ["timeout", "ok"]
    backend_ops(pair, [["remove", None]], ports=None)
    results = backend_ops(pair, [["ensure", None], ["health", None],
                                 ["ban", [[BANNED4, 60], [BANNED6, 60]]]], mode="set-only")
    assert results[1] == {"ok": True, "problems": []}
    assert "RBLGUARD" not in pair.exec(pair.server, ["iptables-save"]).stdout
    assert probe(pair, [(BANNED4, pair.server4, 25)]) == ["ok"]  # nothing uses the set yet
    from rblguard.commands.firewall import admin_lines
    from rblguard.firewall.base import FirewallOptions

    for line in admin_lines(FirewallOptions(backend="ipset", mode="set-only")):
        if line.startswith(("iptables ", "ip6tables ")):
            pair.exec(pair.server, line.split())
    got = probe(pair, [(BANNED4, pair.server4, 25), (BANNED6, pair.server6, 25),
                       (OTHER4, pair.server4, 25), (BANNED4, pair.server4, 8025)])
    assert got == ["timeout", "timeout", "ok", "ok"]
    [removed] = backend_ops(pair, [["remove", None]], mode="set-only")
    assert "references it" in removed["error"]  # the admin's rule still uses the set


def test_rules_mode_counts_each_connection_once_not_each_retransmitted_syn(
        pair: NetnsPair) -> None:
    """N connects from a banned client: N connections counted; their SYN retransmits
    (after 1 s and 3 s within a 3.5 s connect) are packets, not connections."""
    backend_ops(pair, [["ensure", None], ["ban", [[BANNED4, 60], [BANNED6, 60]]]])
    got = probe(pair, [(BANNED4, pair.server4, 25)] * 3 + [(BANNED6, pair.server6, 25)] * 2
                + [(BANNED4, pair.server4, 587)], timeout=3.5)
    assert got == ["timeout"] * 6
    [counters] = backend_ops(pair, [["counters", None]])
    assert counters["4"][1] == 4 and counters["6"][1] == 2  # connections
    assert counters["4"][0] >= 3 * 4 and counters["6"][0] >= 3 * 2  # SYN + 2 retransmits
    # each connect's (source, port) is in the seen set with the 130 s timeout
    seen = pair.exec(pair.server, ["ipset", "list", "rblguard4-seen"]).stdout
    assert seen.count(f"{BANNED4},tcp:") == 4
    assert re.search(r"Header: family inet .*timeout 130\b", seen)
    assert all(120 < int(t) <= 130 for t in re.findall(r",tcp:\d+ timeout (\d+)", seen))
    assert "Type: hash:ip,port" in seen
    # a later connect (a new source port) is a new connection
    assert probe(pair, [(BANNED4, pair.server4, 25)], timeout=0.5) == ["timeout"]
    [counters, health] = backend_ops(pair, [["counters", None], ["health", None]])
    assert counters["4"][1] == 5 and health == {"ok": True, "problems": []}


def test_health_counters_and_counts_read_headers_not_200000_elements(pair: NetnsPair
                                                                      ) -> None:
    """The daemon asks every 5 s: the cost must not grow with the bans in the sets."""
    lines = [f"add rblguard4 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} timeout 3600"
             for i in range(100_000)]
    lines += [f"add rblguard6 2001:db8:{i >> 16:x}:{i & 0xffff:x}::1 timeout 3600"
              for i in range(100_000)]
    backend_ops(pair, [["ensure", None]])
    pair.exec(pair.server, ["ipset", "-exist", "restore"], input="\n".join(lines) + "\n",
              timeout=120)
    proc = pair.exec(pair.server, [sys.executable, "-c", TIMED, ROOT])
    r = json.loads(proc.stdout)
    print(f"ipset, 200,000 elements: health {r['health'] * 1000:.1f} ms, counters "
          f"{r['counters'] * 1000:.1f} ms, counts {r['entry_counts'] * 1000:.1f} ms, "
          f"full list {r['list']:.2f} s")
    assert r["values"]["entry_counts"] == {"4": 100_000, "6": 100_000}
    assert r["values"]["health"] == [True, []]
    assert r["listed"] == 200_000
    for op in ("health", "counters", "entry_counts"):
        assert r[op] < 0.25, (op, r[op])
        assert r["list"] > 3 * r[op], (op, r)


# Runs in the server namespace: the slowest of three calls of each read, and one list().
TIMED = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from rblguard.firewall.base import FirewallOptions
from rblguard.firewall.ipset import IpsetBackend
b = IpsetBackend(FirewallOptions(backend="ipset"))
out = {"values": {}}
for op in ("health", "counters", "entry_counts"):
    times = []
    for _ in range(3):
        t = time.perf_counter(); value = getattr(b, op)(); times.append(time.perf_counter() - t)
    out[op] = max(times)
    if op == "health":
        value = [value.ok, value.problems]
    elif op == "counters":
        value = {f: [c.packets, c.connections] for f, c in value.items()}
    out["values"][op] = value
t = time.perf_counter(); out["listed"] = len(b.list()); out["list"] = time.perf_counter() - t
print(json.dumps(out))
"""
