"""``rblguard simulate``: how many DNSBL queries would rblguard save on *your* log?

It replays the log in time order: every connection line (tcpserver's ``pid N from
ADDR``, and those of the rule packs: Postfix's ``connect from``, postscreen's ``CONNECT
from``, Exim's ``SMTP connection from``) is a connection that reached the DNSBL check,
and every reject a rule recognises tells which connections came from listed clients.
Without banning, each connection costs one DNSBL query per zone asked until one lists
the client (all zones for a client nobody lists).  With a policy, an ideal instant ban
starts at the reject that meets the rule's threshold, and every connection from that
address until the ban ends is dropped in the kernel: it costs nothing.

On a log recorded while rblguard was already banning, the dropped retries never reached
the log: the "no banning" figure is then what the DNSBLs were really asked, and each
policy's figure predicts it for that ban time.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rblguard.durations import format_duration, parse_duration
from rblguard.matching.rules import RuleError, RuleSet, load_rules
from rblguard.matching.scanner import Scanner
from rblguard.matching.sources import scan_source
from rblguard.model import Connection, Event, Match

DAY = 86400.0
SPAMHAUS_LIMITS = {"connections_per_day": 100_000, "queries_per_day": 300_000}
# Which zone a reject came from, when only a count of zones is given: rblsmtpd writes the
# DNSBL's TXT record, which names its operator.
KNOWN_ORDER = ("spamhaus", "spamcop")


@dataclass
class Policy:
    """One ban time's replay: its bans and the queries it lets through."""

    ban_time: float
    queries: int = 0
    blocked: int = 0
    until: dict[str, float] = field(default_factory=dict)
    recent: dict[str, deque[float]] = field(default_factory=dict)
    last_blocked: dict[str, bool] = field(default_factory=dict)

    def connection(self, address: str, t: float, zones: int) -> None:
        """A client connects: blocked in the kernel, or rblsmtpd asks ``zones`` lists."""
        blocked = self.until.get(address, 0.0) > t
        self.last_blocked[address] = blocked
        if blocked:
            self.blocked += 1
        else:
            self.queries += zones

    def reject(self, address: str, t: float, cost: int, zones: int, had_conn: bool,
               threshold: tuple[int, float]) -> None:
        """rblsmtpd rejected it after ``cost`` queries; maybe this ban time bans it."""
        if had_conn and self.last_blocked.get(address):
            return  # blocked in the kernel: rblsmtpd never saw it, never rejected it
        if had_conn:
            self.queries += cost - zones
        elif self.until.get(address, 0.0) > t:
            self.blocked += 1
            return
        else:
            self.queries += cost
        count, window = threshold
        recent = self.recent.setdefault(address, deque())
        recent.append(t)
        while recent and recent[0] <= t - window:
            recent.popleft()
        if len(recent) >= count:
            self.until[address] = t + self.ban_time
            recent.clear()


def parse_zones(text: str) -> tuple[int, list[str]]:
    """(how many zones, their names or []) from ``2`` or ``zen.spamhaus.org,bl.spamcop.net``."""
    text = text.strip()
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= 10:
            raise ValueError(f"--zones {text}: between 1 and 10 zones")
        return count, []
    names = [z.strip().lower() for z in text.split(",") if z.strip()]
    if not names:
        raise ValueError(f"--zones {text!r}: a count or a comma list of zone names")
    return len(names), names


def parse_threshold(text: str) -> tuple[int, float]:
    """``N/WINDOW`` (``3/10m``): N rejects within WINDOW ban."""
    count, sep, window = text.partition("/")
    if not sep or not count.strip().isdigit() or int(count) < 1:
        raise ValueError(f"--threshold {text!r}: write N/WINDOW, e.g. 1/1h or 3/10m")
    return int(count), parse_duration(window)


def zone_position(line: str, zones: int, names: list[str]) -> int:
    """How many zones rblsmtpd asked before one listed this client (1-based)."""
    text = line.lower()
    if names:
        for i, name in enumerate(names, 1):
            labels = name.split(".")
            operator = labels[-2] if len(labels) >= 2 else name
            if operator in text:
                return i
        return 1
    for i, operator in enumerate(KNOWN_ORDER[:zones], 1):
        if operator in text:
            return i
    return 1


def _events(paths: list[str], ruleset: RuleSet) -> Iterator[Event]:
    """Connections and rejects of every path, merged in time order."""
    scanner = Scanner(ruleset)

    def stream(path: str) -> Iterator[tuple[float, int, Event]]:
        last = 0.0
        for n, chunk in enumerate(scan_source(path, ruleset, scanner=scanner)):
            for i, event in enumerate(chunk.events):
                if type(event) in (Match, Connection):
                    last = event.time if event.time is not None else last
                    yield last, n * 10_000_000 + i, event

    for _when, _order, event in heapq.merge(*(stream(p) for p in paths),
                                            key=lambda item: (item[0], item[1])):
        yield event


def simulate(paths: list[str], ban_times: list[float], threshold: tuple[int, float],
             zones: int, names: list[str], rules_dirs: list[str] | None = None,
             packs: tuple[str, ...] = ()) -> dict:
    ruleset = load_rules(rules_dirs, explicit=rules_dirs is not None, require_enabled=True,
                         packs=packs)
    count, window = threshold
    policies = [Policy(b) for b in ban_times]  # each replays the same events
    baseline = connections = rejects = 0
    first = last = None
    open_conn: dict[str, bool] = {}  # address -> a connection awaits its outcome
    for event in _events(paths, ruleset):
        t = event.time if event.time is not None else (last or 0.0)
        first = t if first is None else first
        last = t
        address = event.address
        if type(event) is Connection:
            connections += 1
            baseline += zones
            open_conn[address] = True
            for p in policies:
                p.connection(address, t, zones)
            continue
        rejects += 1
        cost = zone_position(event.line, zones, names)
        had_conn = open_conn.pop(address, False)
        # The connection cost `zones` when it was counted; a listed client cost `cost`.
        baseline += cost - zones if had_conn else cost
        for p in policies:
            p.reject(address, t, cost, zones, had_conn, threshold)
    span = (last - first) if first is not None and last is not None else 0.0
    scale = DAY / span if span > 0 else None

    def per_day(n: int) -> int | None:
        return round(n * scale) if scale else None

    return {
        "paths": paths,
        "connections": connections,
        "rejects": rejects,
        "span_s": round(span, 1),
        "zones": zones,
        "threshold": {"count": count, "window_s": window},
        "baseline": {"queries": baseline, "queries_per_day": per_day(baseline),
                     "connections_per_day": per_day(connections)},
        "policies": [{
            "ban_time_s": p.ban_time,
            "queries": p.queries,
            "cut_pct": round(100 * (baseline - p.queries) / baseline, 2) if baseline else 0.0,
            "connections_blocked": p.blocked,
            "queries_per_day": per_day(p.queries),
        } for p in policies],
        "limits": SPAMHAUS_LIMITS,
    }


def _print(result: dict) -> None:
    limit = result["limits"]["queries_per_day"]
    span = result["span_s"]
    print(f"{result['connections']} connections, {result['rejects']} rejects over "
          f"{span / 3600:.1f} h; {result['zones']} zone(s) per connection")
    print(f"{'policy':<14} {'queries':>10} {'cut':>8} {'per day':>10} {'of limit':>9}")

    def row(name: str, queries: int, cut: float, day: int | None) -> None:
        day_text = f"{day:>10}" if day is not None else f"{'-':>10}"
        share = f"{100 * day / limit:>8.1f}%" if day is not None else f"{'-':>9}"
        print(f"{name:<14} {queries:>10} {cut:>7.1f}% {day_text} {share}")

    row("no banning", result["baseline"]["queries"], 0.0, result["baseline"]["queries_per_day"])
    for p in result["policies"]:
        row(f"ban {format_duration(p['ban_time_s'])}", p["queries"], p["cut_pct"],
            p["queries_per_day"])
    print(f"Spamhaus free use: {result['limits']['connections_per_day']} connections and "
          f"{limit} queries a day")


def main(args: argparse.Namespace) -> int:
    try:
        ban_times = [parse_duration(b) for b in args.ban_time.split(",") if b.strip()]
        if not ban_times:
            raise ValueError("--ban-time: give at least one duration")
        threshold = parse_threshold(args.threshold)
        zones, names = parse_zones(args.zones)
    except ValueError as exc:
        print(f"rblguard simulate: {exc}", file=sys.stderr)
        return 2
    for path in args.paths:
        if not Path(path).exists():
            print(f"rblguard simulate: {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        result = simulate(args.paths, ban_times, threshold, zones, names, args.rules,
                          tuple(args.packs))
    except RuleError as exc:
        print(f"rblguard simulate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
    else:
        _print(result)
    return 0
