"""Prometheus metrics: what rblguard reads, bans, blocks, and saves in DNSBL queries.

Exposed on the ``metrics`` address (default 127.0.0.1:9731), all in one registry of the
``Metrics`` object's own (never prometheus_client's global one, so tests can make many):

=====================================================  ====================================
rblguard_build_info{version}                           1
rblguard_lines_read_total{source}                      complete log lines read
rblguard_matches_total{rule}                           RBL rejects recognised
rblguard_ignored_lines_total{rule,reason}              matches an ignore vetoed (never bans)
rblguard_parse_errors_total{rule}                      reject lines whose address is bad
rblguard_rbl_lookup_errors_total                       DNSBL lookups that failed (lookup-error)
rblguard_dnsbl_error_replies_total{zone,kind}          DNSBL error replies: it refuses us;
                                                       kind open-resolver, volume, typo, other
rblguard_smtp_connections_total                        connection lines (tcpserver, packs)
rblguard_bans_total{rule,family}                       bans (and refreshes) sent to the kernel
rblguard_bans_refused_total{reason}                    allowlist, storm_active, storm_rate,
                                                       set_full, firewall, invalid, dnsbl_error
rblguard_unbans_total{reason}                          bans lifted before their end: manual,
                                                       allowlisted, flush
rblguard_active_bans{family}                           bans in force
rblguard_blocked_connections_total{family}             new connections the kernel dropped
rblguard_blocked_packets_total{family}                 their packets (SYN retransmits too)
rblguard_dnsbl_queries_avoided_total                   blocked connections x zones
rblguard_dnsbl_zones                                   zones rblsmtpd asks (config)
rblguard_ban_latency_seconds                           log line time -> kernel commit
rblguard_source_lag_bytes{source}                      bytes written but not yet read
rblguard_firewall_errors_total{operation}              kernel refusals and repairs
rblguard_firewall_healthy                              1 when every firewall object is intact
rblguard_rule_reloads_total{result}                    success / failure
rblguard_rule_reload_last_success_timestamp_seconds    last good rule load
rblguard_rule_reload_last_failure_timestamp_seconds    last rejected rule load (0: never)
rblguard_housekeeping_last_run_timestamp_seconds       the main loop's heartbeat
rblguard_dnsbl_{queries,connections}_per_day_estimate  recent rate, scaled to a day
rblguard_dnsbl_{queries,connections}_per_day_limit     the DNSBL's free-use limits
=====================================================  ====================================

``kind`` of a DNSBL error reply is one of DNSBL_ERROR_KINDS, read from the reply's text
(rblsmtpd logs the DNSBL's TXT record): Spamhaus answers 127.255.255.254 with
``Error: open resolver; https://check.spamhaus.org/returnc/pub/IP/`` (``open-resolver``:
queries via a public or open resolver), 127.255.255.255 with a ``/returnc/vol/`` text
about an excessive number of queries (``volume``: the free-use cut-off) and
127.255.255.252 with a ``/returnc/typo/`` text (``typo`` in the zone name); anything
else is ``other``.  A fixed set, so the reply's text can never create series.

Label sets the alerts watch (refusal reasons, reload results, firewall operations) exist
from the start at 0: a counter that appears already at 1 shows no ``increase()``, and
its first occurrence, often the one that matters, would never alert.

The DNSBL budget: SMTP connections seen in the last hour (or since start, if shorter,
but at least a minute) scaled to a day.  Every connection that reaches rblsmtpd costs one
query per zone until a zone lists the client, so connections x zones is an upper bound
on queries and connections the lower one; the estimate gauge shows the upper bound.
Connections the kernel drops never reach tcpserver, so they are not in either figure.
"""

from __future__ import annotations

import errno
import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PCounter

from rblguard import __version__
from rblguard.daemon.collectors import (
    FAMILIES,
    ActiveBans,
    KernelCounters,
    RateWindow,
    ReadCounters,
)
from rblguard.daemon.listen import MetricsAddressError, parse_address
from rblguard.firewall.base import Counters
from rblguard.model import ChunkResult, Connection, Event, Ignored, Match, ParseError

REFUSAL_REASONS = ("allowlist", "storm_active", "storm_rate", "set_full", "firewall",
                   "invalid", "dnsbl_error")
FIREWALL_OPERATIONS = ("ban", "health", "counters")
DNSBL_ERROR_KINDS = ("open-resolver", "volume", "typo", "other")
# Searched in this order in a DNSBL error reply's text; the return-code URLs first, or
# the A record where a line shows it (postscreen's dnsblog: "as 127.255.255.254").
_DNSBL_ERROR_PATTERNS = (
    ("open-resolver", re.compile(r"/returnc/pub\b|open resolver|public resolver|"
                                 r" as 127\.255\.255\.254$", re.IGNORECASE)),
    ("volume", re.compile(r"(?i)/returnc/vol\b|excessive number of queries|query volume|"
                          r"too many queries|excess(?:ive)? volume| as 127\.255\.255\.255$")),
    ("typo", re.compile(r"(?i)/returnc/typo\b|\btypo\b|typing error| as 127\.255\.255\.252$")),
)
UNBAN_REASONS = ("manual", "allowlisted", "flush")  # rblguard_unbans_total{reason}
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)


def dnsbl_error_kind(text: str) -> str:
    """What a DNSBL error reply says went wrong: one of DNSBL_ERROR_KINDS."""
    for kind, pattern in _DNSBL_ERROR_PATTERNS:
        if pattern.search(text):
            return kind
    return "other"


class Metrics:
    """Every metric of one daemon, and the small methods the daemon records through.

    ``clock`` (monotonic) drives the budget's window and ``wall_clock`` the timestamps;
    tests pass their own.
    """

    def __init__(self, zones: int = 2, connections_per_day: int = 100_000,
                 queries_per_day: int = 300_000, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = r = CollectorRegistry()
        self.zones = zones
        self.limits = (connections_per_day, queries_per_day)
        self.wall_clock = wall_clock
        self.server: Any = None
        Gauge("rblguard_build_info", "rblguard version", ["version"], registry=r).labels(
            __version__).set(1)
        self.read = ReadCounters()  # lines and connections: they move at every wake-up
        r.register(self.read)
        self.matches = PCounter("rblguard_matches", "RBL rejects recognised", ["rule"],
                                registry=r)
        self.ignored = PCounter("rblguard_ignored_lines", "Matches an ignore vetoed",
                                ["rule", "reason"], registry=r)
        self.parse_errors = PCounter("rblguard_parse_errors",
                                     "Reject lines whose address did not parse", ["rule"],
                                     registry=r)
        self.lookup_errors = PCounter("rblguard_rbl_lookup_errors",
                                      "DNSBL lookups that failed (lookup-error lines)",
                                      registry=r)
        self.dnsbl_errors = PCounter("rblguard_dnsbl_error_replies",
                                     "DNSBL error replies: the DNSBL refuses our queries",
                                     ["zone", "kind"], registry=r)
        self.bans = PCounter("rblguard_bans", "Bans sent to the kernel", ["rule", "family"],
                             registry=r)
        self.refusals = PCounter("rblguard_bans_refused", "Bans refused", ["reason"],
                                 registry=r)
        self.unbans = PCounter("rblguard_unbans", "Bans lifted before their end",
                               ["reason"], registry=r)
        for reason in UNBAN_REASONS:
            self.unbans.labels(reason)
        self.active = ActiveBans()
        r.register(self.active)
        self.latency = Histogram("rblguard_ban_latency_seconds",
                                 "Log line time to kernel commit", buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.lag = Gauge("rblguard_source_lag_bytes", "Bytes written but not yet read",
                         ["source"], registry=r)
        self.fw_errors = PCounter("rblguard_firewall_errors", "Firewall refusals and repairs",
                                  ["operation"], registry=r)
        self.fw_healthy = Gauge("rblguard_firewall_healthy",
                                "1 when the firewall objects are intact", registry=r)
        self.reloads = PCounter("rblguard_rule_reloads", "Rule loads", ["result"],
                                registry=r)
        self.reload_ok = Gauge("rblguard_rule_reload_last_success_timestamp_seconds",
                               "Time of the last good rule load", registry=r)
        self.reload_failed = Gauge("rblguard_rule_reload_last_failure_timestamp_seconds",
                                   "Time of the last rejected rule load (0: none)",
                                   registry=r)
        self.heartbeat = Gauge("rblguard_housekeeping_last_run_timestamp_seconds",
                               "When the main loop last did its housekeeping", registry=r)
        Gauge("rblguard_dnsbl_zones", "DNSBL zones rblsmtpd asks per connection",
              registry=r).set(zones)
        Gauge("rblguard_dnsbl_queries_per_day_limit", "DNSBL free-use query limit",
              registry=r).set(queries_per_day)
        Gauge("rblguard_dnsbl_connections_per_day_limit", "DNSBL free-use connection limit",
              registry=r).set(connections_per_day)
        self.kernel = KernelCounters(zones, self.budget)
        r.register(self.kernel)
        self.window = RateWindow(clock)
        self.fw_healthy.set(1)
        self.heartbeat.set(wall_clock())
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for operation in FIREWALL_OPERATIONS:
            self.fw_errors.labels(operation)
        self.match_total: Counter[str] = Counter()

    # -- serving ----------------------------------------------------------------------

    def serve(self, address: object) -> None:
        """Serve /metrics on ``host:port`` in a thread of its own.

        ``:9731`` listens on every interface (IPv6 and IPv4 where the kernel allows
        both on one socket).  A taken port raises MetricsAddressError naming it.
        """
        from prometheus_client import start_http_server

        host, port = parse_address(address)
        try:
            started = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            if host == "::" and exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                return self.serve(f"0.0.0.0:{port}")  # IPv6 disabled in this kernel
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            why = ("the port is taken (another rblguard or exporter?)"
                   if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc))
            raise MetricsAddressError(exc.errno, f"cannot serve metrics on {shown}: {why}; "
                                      "change 'metrics' in the config") from exc
        # prometheus_client >= 0.17 returns (server, thread); 0.16 returns None
        self.server = started[0] if isinstance(started, tuple) else None

    def close(self) -> None:
        """Stop serving (where prometheus_client lets us: 0.17 and later)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- what the daemon records --------------------------------------------------------

    def observe_chunk(self, source: str, result: ChunkResult) -> None:
        """Count what the scanner found in one chunk: one pass of local counting, then
        one ``inc`` per label set (a chunk may hold thousands of events).  Called once
        per wake-up of the daemon, so the labelled children are looked up once each and
        kept: ``labels()`` costs more than the ``inc``."""
        if result.lines:
            lines = self.read.lines
            lines[source] = lines.get(source, 0) + result.lines
        connections = result.connection_count
        if result.events or result.match_counts:
            connections += self._count_events(result)
        self.read.connections += connections

    @property
    def connection_total(self) -> int:
        """SMTP connections seen since the start (the DNSBL budget's figure)."""
        return self.read.connections

    def _count_events(self, result: ChunkResult) -> int:
        """Matches, ignored lines, DNSBL and parse errors of one chunk; its connections.
        Connections and matches are nearly every event: counted in the first pass."""
        matches: dict[str, int] = {}
        rare: list[Event] = []
        connections = 0
        for (rule, _address), n in (result.match_counts or {}).items():
            matches[rule] = matches.get(rule, 0) + n
        for event in result.events:
            kind = type(event)
            if kind is Connection:
                connections += 1
            elif kind is Match:
                matches[event.rule] = matches.get(event.rule, 0) + 1
            else:
                rare.append(event)
        for rule, n in matches.items():
            self._child(self.matches, rule).inc(n)
        self.match_total.update(matches)
        if rare:
            self._count_rare(rare)
        return connections

    def _count_rare(self, events: list[Event]) -> None:
        ignored: Counter[tuple[str, str]] = Counter()
        dnsbl_errors: Counter[tuple[str, str]] = Counter()
        parse_errors: Counter[str] = Counter()
        lookup_errors = 0
        for event in events:
            if type(event) is Ignored:
                ignored[event.rule, event.reason] += 1
                if event.kind == "dnsbl-error":
                    dnsbl_errors[event.zone or "unknown", dnsbl_error_kind(event.line)] += 1
                elif event.kind == "lookup-error":
                    lookup_errors += 1
            elif type(event) is ParseError:
                parse_errors[event.rule] += 1
        for labels, n in ignored.items():
            self._child(self.ignored, *labels).inc(n)
        for labels, n in dnsbl_errors.items():
            self._child(self.dnsbl_errors, *labels).inc(n)
        for rule, n in parse_errors.items():
            self._child(self.parse_errors, rule).inc(n)
        if lookup_errors:
            self.lookup_errors.inc(lookup_errors)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered.  Bounded: label values are rules,
        sources, ignore names and DNSBL zones, all few; past 10,000 it starts again."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) >= 10_000:
                self._children.clear()
            child = self._children[key] = metric.labels(*labels)
        return child

    def matches_by_rule(self) -> dict[str, int]:
        return dict(self.match_total)

    def ban(self, rule: str, family: int) -> None:
        self.bans.labels(rule, FAMILIES[family]).inc()

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def unbanned(self, reason: str, count: int = 1) -> None:
        """``count`` bans lifted early; ``reason`` is one of UNBAN_REASONS."""
        self.unbans.labels(reason).inc(count)

    def set_active(self, counts: dict[int, int]) -> None:
        """Bans in force per family, for when no live count is watched (watch_active).
        The daemon's housekeeping calls this every round, so it also beats the
        heartbeat that the "main loop stuck" alert watches."""
        self.active.last = dict(counts)
        self.heartbeat.set(self.wall_clock())

    def watch_active(self, counts: Callable[[], dict[int, int]]) -> None:
        """Read ``rblguard_active_bans`` from ``counts`` at every scrape: exact right
        after a burst, where a value set in the 5 s housekeeping round lags.  It runs
        on prometheus_client's HTTP thread: ``counts`` must be safe to call from any
        thread (the decider's active_counts copies two ints it keeps up to date)."""
        self.active.source = counts

    def set_kernel_counters(self, counters: dict[int, Counters]) -> None:
        """Absolute drop counters as read from the kernel, keyed by family 4/6."""
        self.kernel.update(counters)
        self.budget()  # takes a sample: the window keeps moving between scrapes

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
        (self.reload_ok if ok else self.reload_failed).set(self.wall_clock())

    def budget(self) -> dict[str, float | int]:
        """Per-day estimates against the limits, for the gauges and ``rblguard status``."""
        per_day = self.window.per_day(self.connection_total)
        return {
            "zones": self.zones,
            "connections_per_day_estimate": round(per_day),
            "queries_per_day_estimate": round(per_day * self.zones),
            "connections_per_day_limit": self.limits[0],
            "queries_per_day_limit": self.limits[1],
            "connections_seen_total": self.connection_total,
            "queries_avoided_total": self.kernel.avoided(),
        }
