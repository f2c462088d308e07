"""``rblguard scan``: read logs from start to end and report what rblguard would see.

No firewall, no state: it answers "what is in this log?" — rejects per rule, the lines
that must never ban (lookup errors, DNSBL error replies), unparsable addresses, and the
offenders.  DNSBL error replies get a loud warning: they mean the DNSBL is refusing this
server's queries, the very cut-off rblguard exists to prevent.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import itertools
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from rblguard.addresses import add_counts
from rblguard.matching import counting
from rblguard.matching.rules import RuleError, RuleSet, load_rules
from rblguard.matching.scanner import Scanner
from rblguard.model import ChunkResult, Connection, Ignored, Match, ParseError
from rblguard.sources.files import log_files, read_windows
from rblguard.sources.stamps import FORMATS, NONE, StampFormat, detect_file_format


class ScanReport:
    """Totals over every chunk of every file scanned."""

    def __init__(self) -> None:
        self.lines = self.connections = self.parse_errors = 0
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.by_rule: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()
        self.ignored_kinds: Counter[str] = Counter()
        self.dnsbl_zones: Counter[str] = Counter()
        self.offenders: Counter[str] = Counter()
        self.files: list[str] = []
        self.first_dnsbl_error: str | None = None
        # matches per rule by address as the log spells it, until settle() makes them
        # canonical: once for all the parts one process scans, not once per window
        self.raw: dict[str, Counter[bytes]] = {}

    def add(self, chunk: ChunkResult) -> None:
        self.lines += chunk.lines
        if chunk.first_time is not None and (self.first_time is None
                                             or chunk.first_time < self.first_time):
            self.first_time = chunk.first_time
        if chunk.last_time is not None and (self.last_time is None
                                            or chunk.last_time > self.last_time):
            self.last_time = chunk.last_time
        offenders = self.offenders
        by_rule = self.by_rule
        if chunk.match_counts:
            for (rule, address), n in chunk.match_counts.items():
                by_rule[rule] += n
                offenders[address] += n
        self.connections += chunk.connection_count
        for event in chunk.events:
            kind = type(event)
            if kind is Match:
                by_rule[event.rule] += 1
                offenders[event.address] += 1
            elif kind is Connection:
                self.connections += 1
            elif kind is Ignored:
                self.ignored[event.reason] += 1
                self.ignored_kinds[event.kind] += 1
                if event.kind == "dnsbl-error":
                    self.dnsbl_zones[event.zone or "unknown"] += 1
                    if self.first_dnsbl_error is None:
                        self.first_dnsbl_error = event.line
            elif kind is ParseError:
                self.parse_errors += 1

    def ranked(self, top: int | None = None) -> list[tuple[str, int]]:
        """Offenders, most matches first, ties by address: the order must not depend on
        where the file was cut into chunks or between processes.  With ``top``, only
        the first ``top`` (picked without sorting tens of thousands)."""
        if top is not None:
            return heapq.nsmallest(top, self.offenders.items(), key=_rank)
        return sorted(self.offenders.items(), key=_rank)

    def as_json(self, top: int, with_list: bool) -> dict:
        ranked = self.ranked() if with_list else self.ranked(max(top, 0))
        out = {
            "lines": self.lines,
            "matches": sum(self.by_rule.values()),
            "by_rule": dict(sorted(self.by_rule.items())),
            "ignored": dict(sorted(self.ignored.items())),
            "lookup_errors": self.ignored_kinds.get("lookup-error", 0),
            "dnsbl_errors": self.ignored_kinds.get("dnsbl-error", 0),
            "dnsbl_errors_by_zone": dict(sorted(self.dnsbl_zones.items())),
            "parse_errors": self.parse_errors,
            "addresses": len(self.offenders),
            "first_time": self.first_time,
            "last_time": self.last_time,
            "files": self.files,
            "top": [{"address": a, "matches": n} for a, n in ranked[:max(top, 0)]],
        }
        if with_list:
            out["offenders"] = dict(ranked)
        return out


    def merge(self, other: ScanReport) -> None:
        """Fold in the report of another part of the logs (another file or process)."""
        self.lines += other.lines
        for mine, theirs in ((self.by_rule, other.by_rule), (self.ignored, other.ignored),
                             (self.ignored_kinds, other.ignored_kinds),
                             (self.dnsbl_zones, other.dnsbl_zones)):
            mine.update(theirs)
        add_counts(self.offenders, other.offenders)
        self.take_raw(other)
        self.parse_errors += other.parse_errors
        self.connections += other.connections
        times = [t for t in (self.first_time, other.first_time) if t is not None]
        self.first_time = min(times) if times else None
        times = [t for t in (self.last_time, other.last_time) if t is not None]
        self.last_time = max(times) if times else None
        self.first_dnsbl_error = self.first_dnsbl_error or other.first_dnsbl_error

    def take_raw(self, other: ScanReport) -> None:
        """Move ``other``'s unsettled matches into this report's (``other`` keeps none)."""
        for rule, found in other.raw.items():
            if rule in self.raw:
                add_counts(self.raw[rule], found)
            else:  # the other part's own, not a copy: it is not used after this
                self.raw[rule] = found
        other.raw = {}

    def settle(self) -> None:
        """Turn ``raw`` into matches by rule and offender (canonical addresses) and
        parse errors: once for all the parts merged into this report so far."""
        by_rule, errors = counting.resolve(self.raw, 0)
        self.raw = {}
        for rule, counts in by_rule.items():
            if counts:
                self.by_rule[rule] += sum(counts.values())
                add_counts(self.offenders, counts)
        self.parse_errors += len(errors)


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


# A file at least this large is scanned in two halves by two processes.  A second
# process costs about 35 ms of CPU whatever the size (its copies of the pages both
# write to, and the addresses both halves hold made canonical twice) and saves about
# half of the scan's wall time: that pays from about 100 MB (90 MB: 37 ms more CPU for
# 30 ms sooner; 363 MB: 35 ms for 162 ms sooner).  Below it, on a busy mail host, the
# CPU counts for more than those milliseconds (docs/benchmarks.md, parse.py).
PARALLEL_MIN_BYTES = 128 << 20
_worker_scanner: Scanner | None = None


def _scan_part(part: tuple[str, int, int, str]) -> ScanReport:
    """Tally one byte range of one file (runs in a forked worker or in-process)."""
    path, start, end, fmt_name = part
    assert _worker_scanner is not None
    fmt = _format(fmt_name)
    ref = os.stat(path).st_mtime
    report = ScanReport()
    for offset, window, stop in read_windows(path, start, end):
        report.add(_worker_scanner.tally_window(window, stop, offset, fmt, ref, report.raw))
    return report


def _format(name: str) -> StampFormat:
    return next(f for f in (*FORMATS, NONE) if f.name == name)


def _scan_share(parts: list[tuple[str, int, int, str]],
                share: list[int]) -> dict[int, ScanReport]:
    """{part index: report} of the parts ``share`` names, as one process of a forked
    scan scans them: settled together, their addresses made canonical in one pass
    (by the first report), side by side with the other processes.

    Not the parent all of them after the children: an address seen by two processes
    is then done twice, for little CPU (a 1 M-line scan: 0.164 against 0.153 s inside
    the process; whole processes 0.267 against 0.272 s) and less wall time (0.086
    against 0.098 s; whole, 0.19 against 0.21)."""
    reports = {i: _scan_part(parts[i]) for i in share}
    if reports:
        first, *rest = reports.values()
        for report in rest:
            first.take_raw(report)
        first.settle()
    return reports


def _parts(path: str, workers: int) -> list[tuple[str, int, int, str]]:
    """The file cut at line boundaries into ``workers`` ranges, with its stamp format."""
    with open(path, "rb") as f:
        fmt = detect_file_format(f)
        size = os.fstat(f.fileno()).st_size
        cuts = [0]
        for k in range(1, workers if size >= PARALLEL_MIN_BYTES else 1):
            f.seek(size * k // workers)
            f.readline()
            cuts.append(f.tell())
        cuts.append(size)
    return [(path, a, b, fmt.name) for a, b in itertools.pairwise(cuts) if b > a]


def scan_paths(paths: list[str], ruleset: RuleSet) -> ScanReport:
    """Scan every file of every path; OSError naming a path that cannot be read."""
    global _worker_scanner
    report = ScanReport()
    # Connections are left to `simulate`: counting them would cost scan a second pass.
    _worker_scanner = Scanner(ruleset, connections=False)
    workers = min(2, os.cpu_count() or 1)
    parts = []
    for path in paths:
        files = [str(f) for f in log_files(path)]
        report.files.extend(files)
        for file in files:
            parts.extend(_parts(file, workers))
    with _no_collector():
        if workers > 1 and len(parts) > 1 and sum(b - a for _, a, b, _ in parts) >= \
                PARALLEL_MIN_BYTES:
            for fmt_name in {part[3] for part in parts}:  # compiled once, not per process
                _worker_scanner.prepare(_format(fmt_name))
            scanned = _forked(parts, workers)
        else:
            scanned = [_scan_part(part) for part in parts]
    for part_report in scanned:  # in file order: the first DNSBL error is the earliest
        report.merge(part_report)
    report.settle()
    return report


@contextlib.contextmanager
def _no_collector() -> Iterator[None]:
    """No cyclic garbage collection while scanning.  A scan makes no cycles, but its
    hundreds of thousands of short-lived tuples would set the collector off again and
    again, each time walking every object made so far; and the objects made so far
    (modules, rules) are frozen out of it, so that a forked child neither walks them
    nor copies their pages by writing to them (copy on write)."""
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def _forked(parts: list[tuple[str, int, int, str]], workers: int) -> list[ScanReport]:
    """Each part's report, the parts shared out between this process and forked
    children (a plain fork and a pipe: multiprocessing's pool would cost more to start
    than a child's share of a scan); an exception in a child is raised here."""
    import pickle  # here: a scan in one process never needs it (2.5 ms of a start)

    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for i in sorted(range(len(parts)), key=lambda i: parts[i][1] - parts[i][2]):
        least = loads.index(min(loads))  # the largest parts first, each to the least load
        shares[least].append(i)
        loads[least] += parts[i][2] - parts[i][1]
    children = [_fork_share(parts, share) for share in shares[1:] if share]
    reports: dict[int, ScanReport] = {}
    try:
        reports.update(_scan_share(parts, shares[0]))
    finally:
        failures = []
        for pid, pipe in children:
            with os.fdopen(pipe, "rb") as f:
                payload = f.read()
            os.waitpid(pid, 0)
            result = pickle.loads(payload) if payload else RuntimeError(
                "a scan worker process died")
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                reports.update(result)
    if failures:
        raise failures[0]
    return [reports[i] for i in range(len(parts))]


def _fork_share(parts: list[tuple[str, int, int, str]], share: list[int]) -> tuple[int, int]:
    """(pid, read end of its pipe) of a child that scans the parts ``share`` names and
    writes back {part index: report}, or the exception that stopped it."""
    import pickle  # imported by _forked() already: its name only

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: scan, answer, and never run on into the parent's code
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(_scan_share(parts, share))
            except Exception as exc:  # handed to the parent, which raises it
                payload = pickle.dumps(exc)
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    return pid, read_end


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "-"


def _print_text(report: ScanReport, top: int, with_list: bool) -> None:
    data = report.as_json(top, with_list)
    span = ""
    if report.first_time is not None and report.last_time is not None:
        span = f" ({(report.last_time - report.first_time) / 3600:.1f} h)"
    print(f"files:            {len(report.files)}")
    print(f"lines read:       {data['lines']}")
    print(f"time span:        {_when(report.first_time)} .. {_when(report.last_time)}{span}")
    print(f"rejects (ban):    {data['matches']}")
    for rule, n in sorted(report.by_rule.items()):
        print(f"  {rule:<24} {n}")
    print(f"ignored:          {sum(report.ignored.values())}")
    for reason, n in sorted(report.ignored.items()):
        print(f"  {reason:<24} {n}")
    print(f"parse errors:     {data['parse_errors']}")
    print(f"offenders:        {data['addresses']} distinct addresses")
    if data["top"]:
        print(f"top {len(data['top'])}:")
        for row in data["top"]:
            print(f"  {row['address']:<40} {row['matches']}")
    if with_list:
        print("all offenders:")
        for address, n in report.ranked():
            print(f"{address}\t{n}")


def main(args: argparse.Namespace) -> int:
    for path in args.paths:
        if not Path(path).exists():
            print(f"rblguard scan: {path}: no such file or directory", file=sys.stderr)
            return 2
    try:
        ruleset = load_rules(args.rules, explicit=args.rules is not None, require_enabled=True,
                             packs=args.packs)
    except RuleError as exc:
        print(f"rblguard scan: {exc}", file=sys.stderr)
        return 2
    try:
        report = scan_paths(args.paths, ruleset)
    except OSError as exc:
        print(f"rblguard scan: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if report.ignored_kinds.get("dnsbl-error"):
        zones = ", ".join(f"{z} ({n})" for z, n in sorted(report.dnsbl_zones.items(),
                                                          key=lambda zn: (-zn[1], zn[0])))
        print(f"rblguard scan: WARNING: {report.ignored_kinds['dnsbl-error']} DNSBL error "
              f"replies ({zones}): the DNSBL is refusing this server's queries, and "
              f"rblsmtpd rejects every client with them. First: {report.first_dnsbl_error}",
              file=sys.stderr)
    if args.json:
        json.dump(report.as_json(args.top, args.list), sys.stdout)
        sys.stdout.write("\n")
    else:
        _print_text(report, args.top, args.list)
    # The command ends here.  Frozen, its objects are not walked once more by the
    # interpreter's last collection on the way out: 10-15 ms of a 1 M-line scan's 0.18 s.
    gc.freeze()
    return 0
