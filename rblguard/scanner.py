"""The chunk scanner: turns a buffer of complete log lines into events, fast.

Instead of running a regular expression per line, each rule's compiled pattern (which
starts with a fixed text such as ``rblsmtpd: ``) searches the whole buffer at once, and
only its hits are checked in Python: the hit must stand exactly at the message start of
its line (right after the stamp), so text a client chose elsewhere in a line can never
be taken for a reject.  ``rblguard scan``, ``simulate`` and the daemon's live following
all use this one scanner.

Syslog lines are the exception: their message is rebuilt from the tag (see
rblguard.stamps), so they are matched line by line, which is slower but the same logic.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from rblguard.addresses import canonical_address
from rblguard.model import ChunkResult, Connection, Event, Ignored, Match, ParseError
from rblguard.rules import Rule, RuleSet
from rblguard.stamps import TAI64_UNIX_OFFSET, TAI64N, StampFormat, detect_format, split_line

CHUNK_SIZE = 8 << 20
# tcpserver -v writes one of these per accepted connection; each one reached rblsmtpd.
CONNECTION = re.compile(rb"tcpserver: pid \d+ from (?P<addr>[^\s,;]+)$", re.MULTILINE)
_URL_HOST = re.compile(rb"https?://([A-Za-z0-9.-]+)")


def _dnsbl_zone(text: bytes) -> str | None:
    """The DNSBL operator named by an error reply's URL (``spamhaus.org``), if any."""
    m = _URL_HOST.search(text)
    if m is None:
        return None
    return ".".join(m.group(1).decode("ascii", "replace").lower().split(".")[-2:])


class Scanner:
    """Finds the events of one rule set in buffers of complete lines."""

    def __init__(self, ruleset: RuleSet, *, connections: bool = True) -> None:
        self.rules = ruleset.rules
        self.connections = connections

    def scan(self, buf: bytes, base: int, fmt: StampFormat, ref_time: float) -> ChunkResult:
        """Events of ``buf`` (complete lines, starting at byte ``base`` of its file)."""
        result = ChunkResult(lines=buf.count(b"\n"), end_offset=base + len(buf))
        if not buf:
            return result
        first_end = buf.find(b"\n")
        result.first_time = split_line(fmt, buf[:first_end], ref_time)[0]
        last_start = buf.rfind(b"\n", 0, len(buf) - 1) + 1
        result.last_time = split_line(fmt, buf[last_start:-1], ref_time)[0]
        if fmt.syslog:
            self._scan_lines(buf, base, fmt, ref_time, result.events)
        else:
            self._scan_buffer(buf, base, fmt, ref_time, result)
        return result

    # -- the fast path: whole-buffer search, then an anchor check per hit ------------

    def _anchor(self, buf: bytes, pos: int, fmt: StampFormat, ref: float):
        """(line start, time) if ``pos`` is the message start of its line, else None."""
        ls = buf.rfind(b"\n", 0, pos) + 1
        width = fmt.fixed_width
        if width is not None and pos - ls != width:
            return None
        if fmt.prefix is None:
            return ls, None
        m = fmt.prefix.match(buf, ls)
        if m is None or m.end() != pos:
            return None
        if fmt is TAI64N:  # the common case, inlined
            return ls, int(m.group(1), 16) - TAI64_UNIX_OFFSET + int(m.group(2), 16) / 1e9
        return ls, fmt.parse(m, ref)

    def _scan_buffer(self, buf: bytes, base: int, fmt: StampFormat, ref: float,
                     result: ChunkResult) -> None:
        runs: list[list[Event]] = []
        claimed: set[int] = set()  # line starts already matched by an earlier rule
        for rule in self.rules:
            events: list[Event] = []
            for m in rule.regex.finditer(buf):
                pos = m.start()
                anchored = self._anchor(buf, pos, fmt, ref)
                if anchored is None:
                    continue
                ls, when = anchored
                if ls in claimed:
                    continue
                le = buf.find(b"\n", pos)
                if m.end() > le:  # a pattern with \s ran into the next line
                    m = rule.regex.match(buf, pos, le)
                    if m is None:
                        continue
                claimed.add(ls)
                event = self._classify(rule, m, buf, pos, le, when, base + le + 1)
                events.append(event)
            if events:
                runs.append(events)
        if self.connections:
            events = []
            for m in CONNECTION.finditer(buf):
                pos = m.start()
                anchored = self._anchor(buf, pos, fmt, ref)
                if anchored is None:
                    continue
                address = canonical_address(m.group("addr").decode("ascii", "replace"))
                if address is not None:
                    events.append(Connection(address, anchored[1], base + m.end() + 1))
            if events:
                runs.append(events)
        if len(runs) == 1:
            result.events = runs[0]
        elif runs:
            result.events = sorted((e for run in runs for e in run), key=_offset)

    @staticmethod
    def _classify(rule: Rule, m: re.Match[bytes], buf: bytes, pos: int, le: int,
                  when: float | None, offset: int) -> Event:
        """Match, Ignored or ParseError for one anchored hit of ``rule``."""
        for ig in rule.ignores:
            if ig.regex.search(buf, pos, le):
                text = buf[pos:le]
                zone = _dnsbl_zone(text) if ig.kind == "dnsbl-error" else None
                address = canonical_address(m.group("addr").decode("ascii", "replace"))
                return Ignored(rule.name, ig.name, ig.kind, zone, address, when,
                               text.decode("utf-8", "replace"), offset)
        address = canonical_address(m.group("addr").decode("ascii", "replace"))
        line = buf[pos:le].decode("utf-8", "replace")
        if address is None:
            return ParseError(rule.name, line, when, offset)
        return Match(rule.name, address, when, line, offset)

    # -- the line path: syslog, samples, and anything whose message is rebuilt ---------

    def classify_message(self, message: bytes, when: float | None, offset: int) -> Event | None:
        """The event one message gives, or None: the same decision as the fast path."""
        for rule in self.rules:
            m = rule.regex.match(message)
            if m is not None and b"\n" not in message[: m.end()]:
                return self._classify(rule, m, message, 0, len(message), when, offset)
        if self.connections:
            m = CONNECTION.match(message)
            if m is not None:
                address = canonical_address(m.group("addr").decode("ascii", "replace"))
                if address is not None:
                    return Connection(address, when, offset)
        return None

    def _scan_lines(self, buf: bytes, base: int, fmt: StampFormat, ref: float,
                    events: list[Event]) -> None:
        start = 0
        for line in buf.split(b"\n")[:-1]:
            start += len(line) + 1
            when, message = split_line(fmt, line, ref)
            event = self.classify_message(message, when, base + start)
            if event is not None:
                events.append(event)


def _offset(event: Event) -> int:
    return event.offset


def read_complete_lines(path: str | Path, start: int = 0,
                        chunk_size: int = CHUNK_SIZE) -> Iterator[tuple[int, bytes]]:
    """(offset, buffer) pairs of a file's complete lines, in order, from ``start``.

    A last line without its newline is left out: it is not complete yet.  A line longer
    than a chunk is read whole, however long.
    """
    with open(path, "rb") as f:
        f.seek(start)
        offset, carry = start, b""
        while True:
            data = f.read(chunk_size)
            if not data:
                return
            data = carry + data if carry else data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            yield offset, data[:cut]
            offset += cut
            carry = data[cut:]


def scan_file(path: str | Path, scanner: Scanner) -> Iterator[ChunkResult]:
    """Scan one file from start to end, detecting its stamp format from its first lines."""
    ref = os.stat(path).st_mtime
    fmt: StampFormat | None = None
    for offset, buf in read_complete_lines(path):
        if fmt is None:
            fmt = detect_format(buf)
        yield scanner.scan(buf, offset, fmt, ref)


def scan_source(path: str | Path, ruleset: RuleSet, *,
                scanner: Scanner | None = None) -> Iterator[ChunkResult]:
    """Scan every file of a source (a file, or a multilog directory oldest first)."""
    from rblguard.follow import list_files

    scanner = scanner or Scanner(ruleset)
    for file in list_files(str(path)):
        yield from scan_file(file, scanner)
