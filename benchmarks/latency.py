"""Reject-line-to-kernel latency, restart time with 100,000 bans, memory with 1,000,000.

Run as root:  python benchmarks/latency.py [--steady-rate 200] [--seconds 5]

In a network namespace of its own, a real ``multilog t`` writes the log that a real
``rblguard run`` (nftables backend) follows.  ``nft monitor`` in the same namespace
reports each element as the kernel adds it; the latency of a ban is the time from just
before its reject line was written to the moment ``nft monitor`` printed its element.
Shapes: a steady rate; a botnet wave (1,000 new offenders a second, arriving in clumps
of 100 every 100 ms: the "hundreds of new offenders a second" a wave brings); and,
reported on their own, instant bursts of 500 rejects written within one millisecond.
p50_ms, p99_ms and max_ms are over steady + wave; each shape has its own figures too.

In-run reference: one ``nft add element`` process per ban (what a swatch/fail2ban-style
action costs at the very least), timed in the same namespace.

Then: the daemon is stopped, its state is filled with 100,000 active bans, the kernel
set is emptied, and the time from starting the daemon to its READY=1 (sd_notify: bans
restored, following) and to its answering ``status`` is measured; likewise its resident
memory with 1,000,000 bans.

Last line: JSON with p50_ms, p99_ms, max_ms, restart_ready_100k_s, restart_status_100k_s,
rss_mb_1m_bans, ...
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

from benchmarks import installed
from rblguard.model import Ban
from rblguard.store.state import State
from tests.daemon_harness import (
    ElementMonitor,
    NotifyListener,
    daemon_namespace,
    reject_message,
)
from tests.multilog import Multilog
from tests.netns import run


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure_latency(harness, log: Multilog, steady_rate: int,
                    seconds: float) -> dict[str, list[float]]:
    """Latency (ms) of every ban, by load shape: ``steady`` (one reject every
    1/steady_rate s), ``wave`` (a botnet wave: 1,000 new offenders a second arriving in
    clumps of 100 every 100 ms) and ``instant`` (500 rejects written within a
    millisecond, five times: far beyond any wave, shown on its own)."""
    monitor = ElementMonitor(harness.ns)
    written: dict[str, tuple[str, float]] = {}  # address -> (shape, when written)

    def write(shape: str, address: str) -> None:
        written[address] = (shape, time.time())
        log.write(reject_message(address))

    def paced(shape: str, network: str, clump: int, every: float, clumps: int) -> None:
        next_at, n = time.monotonic(), 0
        for _ in range(clumps):
            for _ in range(clump):
                n += 1
                write(shape, f"{network}.{n // 250}.{n % 250}")
            next_at += every
            time.sleep(max(0.0, next_at - time.monotonic()))

    paced("steady", "198.18", 1, 1.0 / steady_rate, int(steady_rate * seconds))
    paced("wave", "198.19", 100, 0.1, int(10 * seconds))
    for burst in range(5):
        for i in range(500):
            write("instant", f"198.18.{100 + burst * 2 + i // 250}.{i % 250}")
        time.sleep(1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(monitor.seen) < len(written):
        time.sleep(0.1)
    monitor.stop()
    missing = set(written) - set(monitor.seen)
    if missing:
        print(f"warning: {len(missing)} bans never seen by nft monitor", file=sys.stderr)
    shapes: dict[str, list[float]] = {"steady": [], "wave": [], "instant": []}
    for address, (shape, t) in written.items():
        if address in monitor.seen:
            shapes[shape].append((monitor.seen[address] - t) * 1000)
    return shapes


def reference_process_per_ban(ns: str, count: int = 200) -> list[float]:
    run(["ip", "netns", "exec", ns, "nft", "add table inet refbench; "
         "add set inet refbench s { type ipv4_addr; flags timeout; }"])
    times = []
    for i in range(count):
        t = time.perf_counter()
        run(["ip", "netns", "exec", ns, "nft", "add", "element", "inet", "refbench", "s",
             f"{{ 203.0.113.{i % 250} timeout 1h }}"])
        times.append((time.perf_counter() - t) * 1000)
    run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "refbench"])
    return times


def fill_state(state_dir: str, count: int) -> None:
    state = State(state_dir)
    until = time.time() + 3600
    bans = [Ban(f"198.{18 + (i >> 16)}.{i >> 8 & 255}.{i & 255}", until, "bench", "restore")
            for i in range(count)]
    for start in range(0, count, 50_000):
        state.commit(bans=bans[start:start + 50_000])
    close = getattr(state, "close", None)
    if close:
        close()


def restart_time(harness, count: int) -> tuple[float, float, float]:
    """(seconds from start to READY=1, to answering status, resident MB) with
    ``count`` bans.  READY is what systemd waits for (Type=notify); the status
    answer adds a CLI process's own start (~0.1 s) and the harness's 50 ms polling."""
    harness.kill(15)
    run(["ip", "netns", "exec", harness.ns, "nft", "flush", "ruleset"])
    fill_state(harness.config["state_dir"], count)
    notify = NotifyListener(Path(harness.workdir) / f"notify-{harness.starts + 1}")
    try:
        started = time.time()
        t = time.perf_counter()
        harness.start(timeout=120, env=notify.env)
        elapsed = time.perf_counter() - t
        ready = notify.ready_times()
    finally:
        notify.close()
    ready_s = ready[0] - started if ready else float("nan")
    assert harness.proc is not None
    rss_kb = 0
    for line in Path(f"/proc/{harness.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return ready_s, elapsed, rss_kb / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady-rate", type=int, default=200, help="rejects per second")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--skip-1m", action="store_true", help="skip the 1,000,000-ban RSS")
    args = parser.parse_args()
    installed.compile_package()  # as the package's postinst does
    with tempfile.TemporaryDirectory() as tmp, daemon_namespace(Path(tmp)) as harness:
        harness.write_config(ban_time="1h")
        log = Multilog(Path(tmp) / "log", size=99999, keep=20)
        harness.start()
        try:
            shapes = measure_latency(harness, log, args.steady_rate, args.seconds)
        finally:
            log.close()
        ref = reference_process_per_ban(harness.ns)
        ready_100k, status_100k, _ = restart_time(harness, 100_000)
        rss_1m = None
        if not args.skip_1m:
            _, _, rss_1m = restart_time(harness, 1_000_000)
        harness.kill(15)
    latencies = shapes["steady"] + shapes["wave"]

    def q(values: list[float], p: float) -> float:
        return round(percentile(values, p), 2)

    result = {
        "bans": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": q(latencies, 0.99),
        "max_ms": round(max(latencies), 2),
        "steady_p99_ms": q(shapes["steady"], 0.99),
        "wave_p99_ms": q(shapes["wave"], 0.99),
        "instant_burst_p50_ms": q(shapes["instant"], 0.5),
        "instant_burst_p99_ms": q(shapes["instant"], 0.99),
        "ref_process_per_ban_p50_ms": round(statistics.median(ref), 2),
        "ref_process_per_ban_p99_ms": q(ref, 0.99),
        "restart_ready_100k_s": round(ready_100k, 3),
        "restart_status_100k_s": round(status_100k, 3),
        "rss_mb_1m_bans": round(rss_1m, 1) if rss_1m is not None else None,
    }
    print("| figure | value |\n|---|---:|")
    for key, value in result.items():
        print(f"| {key} | {value} |")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
