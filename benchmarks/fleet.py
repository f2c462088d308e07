"""Fleet propagation, catch-up and hub memory, with real daemons and a real Redis.

Run as root:  python benchmarks/fleet.py [--steady-rate 50] [--seconds 5]

Two daemons (mx0, mx1), each in a network namespace of its own with its own nftables
table, reach a redis-server in a hub namespace over veth links (tests/fleet_harness.py).
The propagation of a ban is the time from just before its reject line was written to
mx0's log to the moment ``nft monitor`` in mx1's namespace printed its element.  Shapes:
a steady rate, and a botnet wave of 1,000 new offenders a second (clumps of 100 every
100 ms, as benchmarks/latency.py).

Then both daemons are stopped; a member of the benchmark's own publishes 100,000 bans
through the real link (the hub's used_memory before and after gives its memory per
100,000 active bans: stream entries and the snapshot), and a third daemon, new to the
fleet, is started: catch-up is the time from its start to 100,000 fleet bans applied
(its ``status``), checked in its kernel set.

Last line: JSON with steady_p50_ms, steady_p99_ms, wave_p50_ms, wave_p99_ms,
catchup_100k_s, redis_mb_per_100k_bans.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry

from benchmarks import installed
from rblguard.fleet.link import Link
from rblguard.fleet.metrics import FleetMetrics
from rblguard.fleet.settings import FleetSettings
from rblguard.model import Ban
from tests.daemon_harness import ElementMonitor, wait_for
from tests.fleet_harness import Fleet, fleet_of

CATCH_UP = 100_000


def address(i: int) -> str:
    """The i-th test address, from 198.18.128.0 on (clear of the hub's veth /24s)."""
    i += 128 << 8
    return f"198.{18 + (i >> 16)}.{i >> 8 & 255}.{i & 255}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def propagate(fleet: Fleet, monitor: ElementMonitor, first: int, clumps: list[int],
              every: float) -> list[float]:
    """Write ``clumps`` (sizes) of rejects to mx0's log, one per ``every`` seconds; the
    propagation delay of each ban, in seconds, once mx1's kernel has all of them."""
    written: dict[str, float] = {}
    n = first
    start = time.monotonic()
    for k, size in enumerate(clumps):
        pause = start + k * every - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing the load, not waiting for a result
        batch = [address(n + j) for j in range(size)]
        n += size
        at = fleet.reject(0, *batch)
        written.update(dict.fromkeys(batch, at))
    wait_for(lambda: all(a in monitor.seen for a in written), 30, "mx1's kernel")
    return [monitor.seen[a] - t for a, t in written.items()]


def hub_memory(fleet: Fleet) -> int:
    return int(fleet.hub.client().info("memory")["used_memory"])


def publish_many(fleet: Fleet, n: int) -> None:
    """``n`` bans published by a member of our own (mx9) through the real link."""
    link = Link(FleetSettings(redis=f"unix://{fleet.hub.socket}", name="mx9"), "0-0",
                lambda _d: None, FleetMetrics(CollectorRegistry()))
    link.start()
    try:
        until = time.time() + 3600
        for start in range(0, n, 10_000):
            link.publish([Ban(f"2001:db8:ff::{i >> 16:x}:{i & 65535:x}", until, "x", "b")
                          for i in range(start + 1, min(n, start + 10_000) + 1)])
        wait_for(lambda: link.status.published >= n, 120, "the publisher")
    finally:
        link.stop()


def catch_up(fleet: Fleet) -> float:
    h = fleet.members[2]
    started = time.monotonic()
    h.start()
    wait_for(lambda: h.cli("status", "--json")["active_bans"]["ipv6"] >= CATCH_UP, 60,
             "the new host's catch-up", every=0.02)
    took = time.monotonic() - started
    wait_for(lambda: sum(":ff::" in e for e in h.kernel_elements()) == CATCH_UP, 30,
             "the new host's kernel set")  # the last batch may still be on its way
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady-rate", type=float, default=50.0, help="bans a second")
    parser.add_argument("--seconds", type=float, default=5.0, help="of each shape")
    args = parser.parse_args()
    installed.compile_package()  # as the package's postinst does
    with tempfile.TemporaryDirectory(prefix="rblguard-fleet-") as tmp, \
            fleet_of(Path(tmp), n=3, start=False) as fleet:
        for h in fleet.members[:2]:
            h.start()
        fleet.wait_up(0, 1)
        monitor = ElementMonitor(fleet.members[1].ns)
        try:
            steady_n = int(args.steady_rate * args.seconds)
            steady = propagate(fleet, monitor, 0, [1] * steady_n, 1 / args.steady_rate)
            wave = propagate(fleet, monitor, steady_n, [100] * int(10 * args.seconds), 0.1)
        finally:
            monitor.stop()
        for h in fleet.members[:2]:
            h.kill(15)
        before = hub_memory(fleet)
        publish_many(fleet, CATCH_UP)
        per_100k = (hub_memory(fleet) - before) / (1 << 20) * 100_000 / CATCH_UP
        catchup = catch_up(fleet)
    result = {
        "steady_rate": args.steady_rate, "steady_bans": len(steady),
        "steady_p50_ms": round(statistics.median(steady) * 1000, 1),
        "steady_p99_ms": round(pct(steady, 0.99), 1),
        "wave_bans": len(wave), "wave_p50_ms": round(statistics.median(wave) * 1000, 1),
        "wave_p99_ms": round(pct(wave, 0.99), 1), "wave_max_ms": round(max(wave) * 1000, 1),
        "catchup_100k_s": round(catchup, 2),
        "redis_mb_per_100k_bans": round(per_100k, 1),
    }
    print(f"propagation steady {result['steady_p50_ms']}/{result['steady_p99_ms']} ms "
          f"(p50/p99), wave {result['wave_p50_ms']}/{result['wave_p99_ms']} ms; "
          f"catch-up of 100,000 bans {catchup:.2f} s; hub {per_100k:.1f} MB per 100,000")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
