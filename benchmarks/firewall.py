"""Firewall backends' throughput: bans, listing, unbans, single-ban latency, bulk restore.

Run as root:  python benchmarks/firewall.py [--count 100000] [--batch 10000]

Inside a network namespace it creates and deletes, for each backend (nftables, ipset):
``--count`` addresses (mostly 198.18.0.0/15, 5% from 2001:db8::/32) banned in batches of
``--batch`` as new offenders (as the daemon bans them: no element to refresh), best of
three rounds alternated with a bulk reference on the same elements (nftables: the text
``add element`` path through libnftables; ipset: ONE ``ipset -exist restore`` process
fed the same lines, the tool's own rate), banned
again as re-bans (each element's clock reset), listed back, and unbanned; the latency
of a few hundred one-entry ``ban()`` calls (the daemon's steady state); and ``--count``
bans put into an empty set in ONE ``ban()`` call (what a restart does).  In-run
reference: one ``nft add element`` / ``ipset add`` process per address for 1,000
addresses, the way a shell action would.

Prints a Markdown table, then as LAST line one JSON object (nft_bans_per_s,
nft_vs_text, ipset_bans_per_s, ipset_vs_restore, ref_process_bans_per_s,
single_ban_p99_ms, restore_100k_s, ...).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rblguard.firewall import make_backend  # noqa: E402
from rblguard.firewall.base import BatchResult, Entry, FirewallOptions  # noqa: E402
from rblguard.firewall.nftelements import sort_entries  # noqa: E402

REF_COUNT = 1_000
SINGLE_BANS = 300
ROUNDS = 3  # new-offender bans and their in-run reference, alternated, best of each


def targets(count: int) -> list[str]:
    """``count`` distinct addresses: 95% IPv4 from 198.18.0.0/15, 5% IPv6."""
    n6 = count // 20
    base4 = int(ipaddress.IPv4Address("198.18.0.0"))
    base6 = int(ipaddress.IPv6Address("2001:db8:1::"))
    out = [str(ipaddress.IPv4Address(base4 + 1 + i)) for i in range(count - n6)]
    out += [str(ipaddress.IPv6Address(base6 + 1 + i)) for i in range(n6)]
    return out


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def reference(kind: str) -> float:
    """Bans per second with one process per address (the slow way rblguard avoids)."""
    addrs = [str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.19.200.0")) + i))
             for i in range(REF_COUNT)]
    if kind == "nftables":
        subprocess.run(["nft", "add table inet rgref; add set inet rgref s "
                        "{ type ipv4_addr; flags timeout; }"], check=True)
        cmd = ["nft", "add", "element", "inet", "rgref", "s", "{ %s timeout 1h }"]
    else:
        subprocess.run(["ipset", "create", "rgref", "hash:net", "timeout", "0"], check=True)
        cmd = ["ipset", "add", "rgref", "%s", "timeout", "3600"]
    start = time.perf_counter()
    for a in addrs:
        subprocess.run([c.replace("%s", a) for c in cmd], check=True)
    rate = REF_COUNT / (time.perf_counter() - start)
    if kind == "nftables":
        subprocess.run(["nft", "delete", "table", "inet", "rgref"], check=True)
    else:
        subprocess.run(["ipset", "destroy", "rgref"], check=True)
    return rate


def restore_reference(addrs: list[str]) -> float:
    """``ipset -exist restore``'s own rate: the same elements, as the same ``add ...
    timeout`` lines, fed to ONE restore process (two fresh sets, one per family)."""
    names = {4: "rgref4", 6: "rgref6"}
    create = "".join(f"create {names[f]} hash:net family {fam} timeout 0 maxelem 1048576\n"
                     for f, fam in ((4, "inet"), (6, "inet6")))
    subprocess.run(["ipset", "-exist", "restore"], input=create, text=True, check=True)
    lines = "".join(f"add {names[6 if ':' in a else 4]} {a} timeout 3600\n" for a in addrs)
    try:
        start = time.perf_counter()
        subprocess.run(["ipset", "-exist", "restore"], input=lines, text=True, check=True)
        return len(addrs) / (time.perf_counter() - start)
    finally:
        for name in names.values():
            subprocess.run(["ipset", "destroy", name], check=False)


def text_reference(backend, entries: list[Entry], batch: int) -> float:
    """The nftables backend's text path (``add element`` through libnftables, what it
    used for everything before nfnetlink.py) on the same entries."""
    start = time.perf_counter()
    for i in range(0, len(entries), batch):
        part = entries[i:i + batch]
        groups = sort_entries(part, BatchResult())
        for name, (group, elements, _) in groups.items():
            if group:
                backend._ban_texts(name, group, elements, False, BatchResult())
    return len(entries) / (time.perf_counter() - start)


def new_bans(backend, kind: str, entries: list[Entry], batch: int) -> dict[str, float]:
    """New offenders in batches, as the daemon bans them (nothing to refresh), and the
    in-run reference on the same elements, alternated ROUNDS times: best of each."""
    ours, ref = [], []
    for _ in range(ROUNDS):
        backend.flush()
        start = time.perf_counter()
        for i in range(0, len(entries), batch):
            r = backend.ban(entries[i:i + batch])
            assert not r.failed, r.failed[:3]
        ours.append(len(entries) / (time.perf_counter() - start))
        if kind == "ipset":
            ref.append(restore_reference([e.target for e in entries]))
        else:
            backend.flush()
            ref.append(text_reference(backend, entries, batch))
    return {"bans_per_s": max(ours), "ref_bulk_bans_per_s": max(ref)}


def measure(kind: str, count: int, batch: int) -> dict[str, float]:
    backend = make_backend(FirewallOptions(backend=kind))
    backend.remove()
    backend.ensure()
    addrs = targets(count)
    # New offenders (no element yet: nothing to refresh), then the same again as
    # re-bans, which must reset each element's clock.
    entries = [Entry(a, 3600, refresh=False) for a in addrs]
    res: dict[str, float] = {}
    try:
        res.update(new_bans(backend, kind, entries, batch))
        backend.flush()
        for i in range(0, count, batch):
            assert not backend.ban(entries[i:i + batch]).failed
        again = [Entry(a, 7200) for a in addrs]
        start = time.perf_counter()
        for i in range(0, count, batch):
            r = backend.ban(again[i:i + batch])
            assert not r.failed, r.failed[:3]
        res["refreshes_per_s"] = count / (time.perf_counter() - start)
        t, listed = timed(backend.list)
        assert len(listed) == count, (kind, len(listed))
        res["list_s"] = t
        start = time.perf_counter()
        for i in range(0, count, batch):
            r = backend.unban(addrs[i:i + batch])
            assert not r.failed, r.failed[:3]
        res["unbans_per_s"] = count / (time.perf_counter() - start)
        singles = []
        for i in range(SINGLE_BANS):
            t, r = timed(backend.ban, [Entry(f"198.19.100.{i % 250 + 1}", 60 + i)])
            singles.append(t * 1000)
        singles.sort()
        res["single_p50_ms"] = statistics.median(singles)
        res["single_p99_ms"] = singles[int(len(singles) * 0.99) - 1]
        backend.flush()
        t, r = timed(backend.ban, entries)
        assert not r.failed and r.done == count, (r.done, r.failed[:3])
        res["restore_s"] = t
        res["ref_process_bans_per_s"] = reference(kind)
    finally:
        backend.remove()
        backend.close()
    return res


def inner(args: argparse.Namespace) -> None:
    results = {kind: measure(kind, args.count, args.batch) for kind in ("nftables", "ipset")}
    n = f"{args.count:,}"
    print(f"| backend | bans/s (batches of {args.batch:,}) | reference bulk /s | list {n} s "
          f"| unbans/s | single ban p50 / p99 ms | {n} in one ban() s "
          "| 1 process per ban, /s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        print(f"| {kind} | {r['bans_per_s']:,.0f} | {r['ref_bulk_bans_per_s']:,.0f} | "
              f"{r['list_s']:.2f} | "
              f"{r['unbans_per_s']:,.0f} | {r['single_p50_ms']:.2f} / "
              f"{r['single_p99_ms']:.2f} | {r['restore_s']:.2f} | "
              f"{r['ref_process_bans_per_s']:,.0f} |")
    nft, ips = results["nftables"], results["ipset"]
    summary = {
        "count": args.count,
        "nft_bans_per_s": round(nft["bans_per_s"]),
        "ipset_bans_per_s": round(ips["bans_per_s"]),
        "nft_text_bans_per_s": round(nft["ref_bulk_bans_per_s"]),
        "nft_vs_text": round(nft["bans_per_s"] / nft["ref_bulk_bans_per_s"], 3),
        "ipset_restore_bans_per_s": round(ips["ref_bulk_bans_per_s"]),
        "ipset_vs_restore": round(ips["bans_per_s"] / ips["ref_bulk_bans_per_s"], 3),
        "nft_refreshes_per_s": round(nft["refreshes_per_s"]),
        "ipset_refreshes_per_s": round(ips["refreshes_per_s"]),
        "ref_process_bans_per_s": round(nft["ref_process_bans_per_s"]),
        "ref_ipset_process_bans_per_s": round(ips["ref_process_bans_per_s"]),
        "single_ban_p50_ms": round(nft["single_p50_ms"], 3),
        "single_ban_p99_ms": round(nft["single_p99_ms"], 3),
        "ipset_single_ban_p50_ms": round(ips["single_p50_ms"], 3),
        "ipset_single_ban_p99_ms": round(ips["single_p99_ms"], 3),
        "restore_100k_s": round(nft["restore_s"], 3),
        "ipset_restore_100k_s": round(ips["restore_s"], 3),
        "nft_list_100k_s": round(nft["list_s"], 3),
        "ipset_list_100k_s": round(ips["list_s"], 3),
        "nft_unbans_per_s": round(nft["unbans_per_s"]),
        "ipset_unbans_per_s": round(ips["unbans_per_s"]),
    }
    print(json.dumps(summary))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args)
        return 0
    ns = f"rgbench-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, __file__, "--inner",
                               "--count", str(args.count), "--batch", str(args.batch)])
        return proc.returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    sys.exit(main())
