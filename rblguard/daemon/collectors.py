"""The metrics whose values are computed when Prometheus scrapes, not kept by
prometheus_client between scrapes: exact at any scrape, and nothing to do in between.

Each is a collector (``collect()`` yields metric families) that the Metrics object
registers in its registry; ``collect()`` runs on prometheus_client's HTTP thread while
the main loop updates what it reads.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rblguard.firewall.base import Counters

FAMILIES = {4: "ipv4", 6: "ipv6"}
WINDOW = 3600.0  # s of history behind the per-day estimates
MIN_SPAN = 60.0  # s: right after start, a burst is not scaled up from a few seconds
SAMPLE_EVERY = 10.0  # s between budget samples: at most WINDOW / SAMPLE_EVERY kept
DAY = 86400.0


class ReadCounters:
    """``rblguard_lines_read_total{source}`` and ``rblguard_smtp_connections_total``.

    Both move at nearly every wake-up of the daemon, and a prometheus_client counter's
    ``inc`` (a lock, two checks, three calls) was a tenth of the Python calls of a
    wake-up; here the main loop adds to plain ints.  Reading them from the HTTP thread
    needs no lock: an int is read whole, and the dict is copied in one C call.
    """

    def __init__(self) -> None:
        self.lines: dict[str, int] = {}  # per configured source: few keys
        self.connections = 0

    def collect(self) -> Iterator[CounterMetricFamily]:
        lines = CounterMetricFamily("rblguard_lines_read", "Complete log lines read",
                                    labels=["source"])
        for source, n in dict(self.lines).items():
            lines.add_metric([source], n)
        connections = CounterMetricFamily("rblguard_smtp_connections",
                                          "SMTP connections seen (connection lines)")
        connections.add_metric([], self.connections)
        yield lines
        yield connections


class ActiveBans:
    """``rblguard_active_bans{family}``, computed when scraped (no work between scrapes)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[int, int]] | None = None
        self.last: dict[int, int] = dict.fromkeys(FAMILIES, 0)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.source() if self.source is not None else self.last
        metric = GaugeMetricFamily("rblguard_active_bans", "Bans in force",
                                   labels=["family"])
        for family, label in FAMILIES.items():
            metric.add_metric([label], counts.get(family, 0))
        yield metric


class KernelCounters:
    """The kernel's drop counters as Prometheus counters, and the budget's estimates.

    Collected on the HTTP thread while the main loop updates them, hence the lock.
    Recreating the firewall objects restarts the kernel's counting at 0: a value below
    the last one read means that, and the last total is carried over, so the exposed
    counters never go down (a reset that already counted past the old value between
    two reads is missed; at most one read interval of drops is lost then).
    """

    def __init__(self, zones: int, budget: Callable[[], dict[str, float | int]]) -> None:
        self.zones = zones
        self.budget = budget  # Metrics.budget: the estimates, computed at the scrape
        self.lock = threading.Lock()
        self.base: dict[tuple[int, str], int] = {}
        self.last: dict[tuple[int, str], int] = {}

    def update(self, counters: dict[int, Counters]) -> None:
        with self.lock:
            for family, c in counters.items():
                for kind, value in (("packets", c.packets), ("connections", c.connections)):
                    key = (family, kind)
                    previous = self.last.get(key, 0)
                    if value < previous:
                        self.base[key] = self.base.get(key, 0) + previous
                    self.last[key] = value

    def total(self, family: int, kind: str) -> int:
        with self.lock:
            return self.base.get((family, kind), 0) + self.last.get((family, kind), 0)

    def avoided(self) -> int:
        return self.zones * sum(self.total(f, "connections") for f in FAMILIES)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        conns = CounterMetricFamily("rblguard_blocked_connections",
                                    "New SMTP connections the kernel dropped",
                                    labels=["family"])
        packets = CounterMetricFamily("rblguard_blocked_packets",
                                      "Packets the kernel dropped (SYN retransmits too)",
                                      labels=["family"])
        for family, name in FAMILIES.items():
            conns.add_metric([name], self.total(family, "connections"))
            packets.add_metric([name], self.total(family, "packets"))
        avoided = CounterMetricFamily(
            "rblguard_dnsbl_queries_avoided",
            "DNSBL queries saved: blocked connections x zones (an upper bound)")
        avoided.add_metric([], self.avoided())
        yield conns
        yield packets
        yield avoided
        budget = self.budget()
        for what, help_text in (("queries", "DNSBL queries a day at the last hour's rate "
                                 "(upper bound: connections x zones)"),
                                ("connections", "SMTP connections a day at the last "
                                 "hour's rate")):
            estimate = GaugeMetricFamily(f"rblguard_dnsbl_{what}_per_day_estimate", help_text)
            estimate.add_metric([], budget[f"{what}_per_day_estimate"])
            yield estimate


class RateWindow:
    """Connection totals sampled every SAMPLE_EVERY s over the last WINDOW s."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.samples: deque[tuple[float, int]] = deque([(clock(), 0)])

    def per_day(self, total: int) -> float:
        now = self.clock()
        with self.lock:
            if now - self.samples[-1][0] >= SAMPLE_EVERY:
                self.samples.append((now, total))
            while len(self.samples) > 2 and now - self.samples[1][0] >= WINDOW:
                self.samples.popleft()
            t0, c0 = self.samples[0]
        return (total - c0) / max(MIN_SPAN, now - t0) * DAY
