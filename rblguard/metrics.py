"""Prometheus metrics: what rblguard reads, bans, blocks, and saves in DNSBL queries.

Exposed on the ``metrics`` address (default 127.0.0.1:9731), all in one registry of the
daemon's own:

==============================================  =========================================
rblguard_build_info{version}                    1
rblguard_lines_read_total{source}               complete log lines read
rblguard_matches_total{rule}                    RBL rejects recognised
rblguard_ignored_lines_total{rule,reason}       matches an ignore vetoed (never a ban)
rblguard_parse_errors_total{rule}               reject lines whose address did not parse
rblguard_rbl_lookup_errors_total                ``temporary RBL lookup error`` lines
rblguard_dnsbl_error_replies_total{zone,kind}   DNSBL error replies: the DNSBL refuses us
rblguard_smtp_connections_total                 tcpserver ``pid N from`` lines
rblguard_bans_total{rule,family}                bans (and refreshes) sent to the kernel
rblguard_bans_refused_total{reason}             allowlist, storm_active, storm_rate, set_full
rblguard_active_bans{family}                    bans in force
rblguard_blocked_connections_total{family}      new connections the kernel dropped
rblguard_blocked_packets_total{family}          their packets (SYN retransmits included)
rblguard_dnsbl_queries_avoided_total            blocked connections x zones asked
rblguard_ban_latency_seconds                    log line time -> kernel commit (histogram)
rblguard_source_lag_bytes{source}               bytes written but not yet read
rblguard_firewall_errors_total{operation}       kernel refusals and repairs
rblguard_firewall_healthy                       1 when every firewall object is intact
rblguard_rule_reloads_total{result}             success / failure
rblguard_rule_reload_last_success_timestamp_seconds
rblguard_dnsbl_{queries,connections}_per_day_{estimate,limit}
==============================================  =========================================

The DNSBL budget: connections seen in the last hour (or since start, if shorter) scaled
to a day, times the zones rblsmtpd asks, is the most the DNSBLs can be asked per day: an
upper bound, as rblsmtpd stops at the first zone that lists a client.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PCounter
from prometheus_client.core import CounterMetricFamily

from rblguard import __version__
from rblguard.firewall.base import Counters
from rblguard.model import ChunkResult, Connection, Ignored, Match, ParseError

FAMILIES = {4: "ipv4", 6: "ipv6"}
WINDOW = 3600.0  # s of history behind the per-day estimates
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                   5, 10)


class _KernelCounters:
    """The kernel's drop counters as Prometheus counters: monotonic across the resets
    that recreating the firewall objects causes (the old total is carried over)."""

    def __init__(self, zones: int) -> None:
        self.zones = zones
        self.base: dict[tuple[int, str], int] = {}
        self.last: dict[tuple[int, str], int] = {}

    def update(self, counters: dict[int, Counters]) -> None:
        for family, c in counters.items():
            for kind, value in (("packets", c.packets), ("connections", c.connections)):
                key = (family, kind)
                if value < self.last.get(key, 0):  # objects recreated: counting restarted
                    self.base[key] = self.base.get(key, 0) + self.last[key]
                self.last[key] = value

    def total(self, family: int, kind: str) -> int:
        return self.base.get((family, kind), 0) + self.last.get((family, kind), 0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        conns = CounterMetricFamily("rblguard_blocked_connections",
                                    "New SMTP connections the kernel dropped", labels=["family"])
        packets = CounterMetricFamily("rblguard_blocked_packets",
                                      "Packets of blocked connections (SYN retransmits too)",
                                      labels=["family"])
        for family, name in FAMILIES.items():
            conns.add_metric([name], self.total(family, "connections"))
            packets.add_metric([name], self.total(family, "packets"))
        avoided = CounterMetricFamily("rblguard_dnsbl_queries_avoided",
                                      "DNSBL queries saved: blocked connections x zones asked")
        avoided.add_metric([], self.avoided())
        yield conns
        yield packets
        yield avoided

    def avoided(self) -> int:
        return self.zones * sum(self.total(f, "connections") for f in FAMILIES)


class Metrics:
    """Every metric of one daemon, and the small methods the daemon records through."""

    def __init__(self, zones: int = 2, connections_per_day: int = 100_000,
                 queries_per_day: int = 300_000) -> None:
        self.registry = r = CollectorRegistry()
        self.zones = zones
        self.limits = (connections_per_day, queries_per_day)
        Gauge("rblguard_build_info", "rblguard version", ["version"], registry=r).labels(
            __version__).set(1)
        self.lines = PCounter("rblguard_lines_read", "Complete log lines read", ["source"],
                              registry=r)
        self.matches = PCounter("rblguard_matches", "RBL rejects recognised", ["rule"],
                                registry=r)
        self.ignored = PCounter("rblguard_ignored_lines", "Matches an ignore vetoed",
                                ["rule", "reason"], registry=r)
        self.parse_errors = PCounter("rblguard_parse_errors",
                                     "Reject lines whose address did not parse", ["rule"],
                                     registry=r)
        self.lookup_errors = PCounter("rblguard_rbl_lookup_errors",
                                      "temporary RBL lookup error lines", registry=r)
        self.dnsbl_errors = PCounter("rblguard_dnsbl_error_replies",
                                     "DNSBL error replies: the DNSBL refuses our queries",
                                     ["zone", "kind"], registry=r)
        self.connections = PCounter("rblguard_smtp_connections",
                                    "SMTP connections seen (tcpserver pid N from lines)",
                                    registry=r)
        self.bans = PCounter("rblguard_bans", "Bans sent to the kernel", ["rule", "family"],
                             registry=r)
        self.refusals = PCounter("rblguard_bans_refused", "Bans refused", ["reason"],
                                 registry=r)
        self.active = Gauge("rblguard_active_bans", "Bans in force", ["family"], registry=r)
        self.latency = Histogram("rblguard_ban_latency_seconds",
                                 "Log line time to kernel commit", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.lag = Gauge("rblguard_source_lag_bytes", "Bytes not yet read", ["source"],
                         registry=r)
        self.fw_errors = PCounter("rblguard_firewall_errors", "Firewall refusals and repairs",
                                  ["operation"], registry=r)
        self.fw_healthy = Gauge("rblguard_firewall_healthy", "1 when the firewall objects "
                                "are intact", registry=r)
        self.reloads = PCounter("rblguard_rule_reloads", "Rule reloads", ["result"],
                                registry=r)
        self.reload_ok = Gauge("rblguard_rule_reload_last_success_timestamp_seconds",
                               "Time of the last good rule load", registry=r)
        self.q_est = Gauge("rblguard_dnsbl_queries_per_day_estimate",
                           "DNSBL queries a day at the recent rate (upper bound)", registry=r)
        self.c_est = Gauge("rblguard_dnsbl_connections_per_day_estimate",
                           "SMTP connections a day at the recent rate", registry=r)
        Gauge("rblguard_dnsbl_queries_per_day_limit", "DNSBL free-use query limit",
              registry=r).set(queries_per_day)
        Gauge("rblguard_dnsbl_connections_per_day_limit", "DNSBL free-use connection limit",
              registry=r).set(connections_per_day)
        self.kernel = _KernelCounters(zones)
        r.register(self.kernel)
        self.fw_healthy.set(1)
        for family in FAMILIES.values():
            self.active.labels(family).set(0)
        self.connection_total = 0
        self.match_total: Counter[str] = Counter()
        self.samples: deque[tuple[float, int]] = deque([(time.time(), 0)])

    def serve(self, address: object) -> None:
        """Listen on ``host:port`` (``[::1]:9731``, ``:9731``; a config ListenAddress)."""
        from prometheus_client import start_http_server

        host, port = (address.host, address.port) if hasattr(address, "port") else \
            str(address).rsplit(":", 1)
        host = str(host).strip("[]") or "0.0.0.0"
        start_http_server(int(port), addr=host, registry=self.registry)

    def observe_chunk(self, source: str, result: ChunkResult) -> None:
        """Count what the scanner found in one chunk (one pass, then one inc per label)."""
        self.lines.labels(source).inc(result.lines)
        matches: Counter[str] = Counter()
        connections = result.connection_count
        for event in result.events:
            kind = type(event)
            if kind is Match:
                matches[event.rule] += 1
            elif kind is Connection:
                connections += 1
            elif kind is Ignored:
                self.ignored.labels(event.rule, event.reason).inc()
                if event.kind == "dnsbl-error":
                    self.dnsbl_errors.labels(event.zone or "unknown", event.reason).inc()
                elif event.kind == "lookup-error":
                    self.lookup_errors.inc()
            elif kind is ParseError:
                self.parse_errors.labels(event.rule).inc()
        for rule, n in matches.items():
            self.matches.labels(rule).inc(n)
        self.match_total.update(matches)
        if connections:
            self.connections.inc(connections)
            self.connection_total += connections

    def matches_by_rule(self) -> dict[str, int]:
        return dict(self.match_total)

    def ban(self, rule: str, family: int) -> None:
        self.bans.labels(rule, FAMILIES[family]).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def set_active(self, counts: dict[int, int]) -> None:
        for family, n in counts.items():
            self.active.labels(FAMILIES[family]).set(n)

    def set_kernel_counters(self, counters: dict[int, Counters]) -> None:
        self.kernel.update(counters)
        now = time.time()
        self.samples.append((now, self.connection_total))
        while len(self.samples) > 2 and now - self.samples[1][0] > WINDOW:
            self.samples.popleft()
        budget = self.budget()
        self.c_est.set(budget["connections_per_day_estimate"])
        self.q_est.set(budget["queries_per_day_estimate"])

    def ban_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def source_lag(self, source: str, lag: int) -> None:
        self.lag.labels(source).set(lag)

    def firewall_error(self, operation: str) -> None:
        self.fw_errors.labels(operation).inc()

    def firewall_health(self, ok: bool) -> None:
        self.fw_healthy.set(1 if ok else 0)

    def reload(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.reload_ok.set(time.time())

    def budget(self) -> dict[str, float | int]:
        """Per-day estimates against the limits, for metrics and ``rblguard status``."""
        (t0, c0), now = self.samples[0], time.time()
        span = max(60.0, now - t0)  # at least a minute: no wild figures right after start
        per_day = (self.connection_total - c0) / span * 86400
        return {
            "zones": self.zones,
            "connections_per_day_estimate": round(per_day),
            "queries_per_day_estimate": round(per_day * self.zones),
            "connections_per_day_limit": self.limits[0],
            "queries_per_day_limit": self.limits[1],
            "connections_seen_total": self.connection_total,
            "queries_avoided_total": self.kernel.avoided(),
        }
