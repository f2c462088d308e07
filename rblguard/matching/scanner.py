"""The chunk scanner: turns a buffer of complete log lines into events, fast.

Instead of running a regular expression per line, each rule's compiled pattern (which
starts with a fixed text such as ``rblsmtpd: ``) searches the whole buffer at once, and
only its hits are checked in Python: the hit must stand exactly at the message start of
its line (right after the stamp), so text a client chose elsewhere in a line can never
be taken for a reject.  ``rblguard scan``, ``simulate`` and the daemon's live following
all use this one scanner.

Syslog lines are the exception: their message is rebuilt from the tag (see
rblguard.sources.stamps), so they are matched line by line, which is slower but the same logic.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterator
from operator import itemgetter

import regex

from rblguard.addresses import BYTES_CACHE, add_counts, canonical_address, canonical_bytes
from rblguard.logs import warn
from rblguard.matching import counting, deadline, prefilter
from rblguard.matching.rules import TCPSERVER, ConnectionLine, Rule, RuleSet
from rblguard.matching.vetoes import (
    BUFFER_TIMEOUT,
    LINE_TIMEOUT,
    dnsbl_zone,
    vetoed_hits,
    vetoed_lines,
    vetoed_tails,
)
from rblguard.model import (
    ChunkResult,
    Connection,
    Event,
    Ignored,
    Match,
    ParseError,
)
from rblguard.sources.stamps import (
    NONE,
    TAI64_UNIX_OFFSET,
    TAI64N,
    StampFormat,
    span_times,
    split_message,
)

Source = Rule | ConnectionLine  # what a pattern of the scanner finds


class Scanner:
    """Finds the events of one rule set in buffers of complete lines."""

    def __init__(self, ruleset: RuleSet, *, connections: bool = True,
                 tcpserver: bool = True, connection_events: bool = True,
                 use_prefilter: bool = True) -> None:
        self.rules = ruleset.rules
        self._disjoint = counting.disjoint([r.literal for r in self.rules])  # for tally()
        self.use_prefilter = use_prefilter  # False: tally() searches whole windows
        # False: connection lines are only counted (ChunkResult.connection_count), as the
        # daemon's metrics need; an event each is for simulate, which replays them.
        self.connection_events = connection_events
        # Front ends first, so that their lines are seen before those they pass on.
        lines = (([TCPSERVER] if tcpserver else []) + ruleset.connections) if connections else []
        self.connection_lines = sorted(lines, key=lambda line: line.behind is not None)
        self.fronts_seen: set[str] = set()  # connection lines met so far (see behind)
        self._compiled: dict[str, list[tuple[Source, regex.Pattern]]] = {}
        self._timed_out: set[str] = set()  # rules already reported as too slow

    def scan(self, buf: bytes, base: int, fmt: StampFormat, ref_time: float, *,
             times: bool = True) -> ChunkResult:
        """Events of ``buf`` (complete lines, starting at byte ``base`` of its file);
        with ``times`` False, without the first and last line's times (the daemon
        reads them only when asked, from its last chunk).

        A last line without its newline is not complete: it is left out, here as in
        every path, and ``end_offset`` stops before it.
        """
        buf = _complete(buf)
        result = ChunkResult(lines=buf.count(b"\n"), end_offset=base + len(buf))
        if not buf:
            return result
        if times:
            result.first_time, result.last_time = span_times(buf, 0, len(buf), fmt, ref_time)
        if fmt.syslog:
            self._scan_lines(buf, base, fmt, ref_time, result.events)
            return result
        try:
            self._scan_buffer(buf, base, fmt, ref_time, result)
        except TimeoutError:  # a hostile line, or a slow rule: each line on its own
            result.events = []
            self._scan_lines(buf, base, fmt, ref_time, result.events)
        return result

    # -- the fast path: one search per rule over the whole buffer ---------------------

    def _patterns(self, fmt: StampFormat) -> list[tuple[Source, regex.Pattern]] | None:
        """Each rule's and connection line's pattern, anchored by a look-behind at
        newline + stamp; None if this format's stamp is not of fixed width.

        The pattern starts with the rule's fixed text, which the regex engine finds fast,
        and the look-behind then proves the hit stands right after its line's stamp:
        the anchor is checked inside the engine, and the stamp's groups give the time.
        The rest of a rule's pattern cannot match a newline (patterns.within_line),
        and the hit is checked to end within its line all the same.
        """
        if fmt.name in self._compiled:
            return self._compiled[fmt.name]
        stamp = fmt.prefix.pattern if fmt.prefix is not None else b""
        try:
            patterns = [(source, regex.compile(counting.anchored(literal, stamp, rest),
                                               counting.FLAGS))
                        for source, literal, rest in self._sources()]
        except regex.error:  # "look-behind requires fixed-width pattern"
            patterns = None
        self._compiled[fmt.name] = patterns
        return patterns

    def _sources(self) -> list[tuple[Source, bytes, bytes]]:
        """(rule, fixed text, rest of the pattern) of each rule, and of connections."""
        sources: list[tuple[Source, bytes, bytes]] = [
            (r, r.literal, r.rest) for r in self.rules]
        sources.extend((line, line.literal, line.rest) for line in self.connection_lines)
        return sources

    def _counts(self, line: ConnectionLine, found: int) -> bool:
        """Whether ``found`` (> 0) hits of ``line`` are connections: not when the front
        end that passes them on has been seen, as they were counted there already."""
        if not found:
            return False
        self.fronts_seen.add(line.name)
        return line.behind not in self.fronts_seen

    def _scan_buffer(self, buf: bytes, base: int, fmt: StampFormat, ref: float,
                     result: ChunkResult) -> None:
        patterns = self._patterns(fmt)
        if patterns is None:
            self._scan_lines(buf, base, fmt, ref, result.events)
            return
        data = b"\n" + buf  # so the first line, too, follows a newline
        base -= 1  # offsets in data are one more than in the file
        parse = fmt.parse
        tai64n = fmt is TAI64N
        runs: list[list[Event]] = []
        claimed: set[int] = set()  # lines already taken by an earlier rule
        several = len(self.rules) > 1
        find = data.find
        cache = BYTES_CACHE
        for rule, pattern in patterns:
            if rule.literal not in data:  # every hit starts with it: no search needed
                continue
            events: list[Event] = []
            append = events.append
            conn = type(rule) is ConnectionLine
            if conn and not self.connection_events:
                found = _usable_addresses(pattern, data)
                result.connection_count += found if self._counts(rule, found) else 0
                continue
            veto = None if conn else rule.veto
            for m in pattern.finditer(data, timeout=BUFFER_TIMEOUT):
                hi, lo, raw = m.group(1, 2, "addr") if tai64n else (None, None, m["addr"])
                when = (int(hi, 16) - TAI64_UNIX_OFFSET + int(lo, 16) / 1e9 if tai64n
                        else parse(m, ref))
                address = cache.get(raw) or canonical_bytes(raw)
                if conn:
                    if address is not None:
                        end = m.end()  # a pattern may stop before its line's end
                        end = end if data[end] == 10 else find(b"\n", end)
                        append(Connection(address, when, base + end + 1, rule.name))
                    continue
                pos = m.start()
                le = find(b"\n", pos)
                if le < m.end():  # the hit runs past its line's end: never trusted
                    continue
                if several:
                    if pos in claimed:
                        continue
                    claimed.add(pos)
                if address is None or (veto is not None and veto.search(
                        data, m.end(), le, timeout=LINE_TIMEOUT)):
                    append(self._classify(rule, m, data, pos, le, when, base + le + 1))
                else:
                    append(Match(rule.name, address, when,
                                 data[pos:le].decode("utf-8", "replace"), base + le + 1))
            if events and (not conn or self._counts(rule, len(events))):
                runs.append(events)
        if len(runs) == 1:
            result.events = runs[0]
        elif runs:
            result.events = sorted((e for run in runs for e in run), key=_offset)

    @staticmethod
    def _classify(rule: Rule, m: regex.Match, buf: bytes, pos: int, le: int,
                  when: float | None, offset: int) -> Event:
        """Match, Ignored or ParseError for one anchored hit of ``rule``."""
        address = canonical_bytes(m.group("addr"))
        if rule.veto is not None and rule.veto.search(buf, m.end(), le, timeout=LINE_TIMEOUT):
            ig = next(ig for ig in rule.ignores
                      if ig.regex.search(buf, m.end(), le, timeout=LINE_TIMEOUT))
            text = buf[pos:le]
            zone = dnsbl_zone(text) if ig.kind == "dnsbl-error" else None
            return Ignored(rule.name, ig.name, ig.kind, zone, address, when,
                           text.decode("utf-8", "replace"), offset)
        line = buf[pos:le].decode("utf-8", "replace")
        if address is None:
            return ParseError(rule.name, line, when, offset)
        return Match(rule.name, address, when, line, offset)

    # -- counting only: what `rblguard scan` needs, without an object per line ----------

    def tally(self, buf: bytes, base: int, fmt: StampFormat, ref_time: float) -> ChunkResult:
        """Like scan(), but Match and Connection events come as counts.

        The same patterns find the same lines; only the per-line Python work is skipped
        (findall and a Counter run in C), which is what makes a full-log scan fast.
        Vetoed and unparsable hits, which are rare, still become events.
        """
        buf = _complete(buf)
        raw: dict[str, Counter[bytes]] = {}
        return self.resolve(raw, self.tally_window(b"\n" + buf, len(buf) + 1, base, fmt,
                                                   ref_time, raw))

    def tally_window(self, window: bytes | bytearray, stop: int, base: int,
                     fmt: StampFormat, ref_time: float,
                     raw: dict[str, Counter[bytes]]) -> ChunkResult:
        """tally() of the lines ``window[1:stop]`` (the first at file byte ``base``;
        ``window[0]`` is a newline, nothing past ``stop`` is read), as
        rblguard.sources.files.read_windows() gives them.

        Each rule's matches are added to ``raw[rule name]`` as the address bytes the
        log holds: resolve() turns them into counts once per distinct address, after
        the last window, instead of once per address and window.
        """
        patterns = None if fmt.syslog or not self._disjoint else self._patterns(fmt)
        if patterns is not None:
            try:
                return self._tally_buffer(window, stop, base, fmt, ref_time, raw)
            except TimeoutError:  # as in scan(): each line on its own, each one bounded
                pass
        return counting.as_counts(self.scan(bytes(window[1:stop]), base, fmt, ref_time))

    def resolve(self, raw: dict[str, Counter[bytes]], into: ChunkResult) -> ChunkResult:
        """``into`` with the matches in ``raw`` added to its counts by canonical address;
        an address that is none becomes a ParseError per match."""
        counts = into.match_counts if into.match_counts is not None else {}
        by_rule, errors = counting.resolve(raw, into.end_offset)
        add_counts(counts, {(name, address): n for name, found in by_rule.items()
                            for address, n in found.items()})
        into.events.extend(errors)
        into.match_counts = counts
        return into

    def _tally_buffer(self, data: bytes | bytearray, stop: int, base: int,
                      fmt: StampFormat, ref_time: float,
                      raw: dict[str, Counter[bytes]]) -> ChunkResult:
        picked = self._prefiltered(data, stop, fmt)
        lines = picked.lines if picked is not None else data.count(b"\n", 1, stop)
        result = ChunkResult(lines=lines, end_offset=base + stop - 1)
        if stop <= 1:
            return result
        result.first_time, result.last_time = span_times(data, 1, stop, fmt, ref_time)
        window, searched = data, fmt
        if picked is not None:  # from here on, search only the messages it picked,
            data, stop, searched = picked.text, len(picked.text), NONE  # stamps checked
        # (rule, hits, vetoed addresses): added to raw only once every search is done,
        # so that a search that runs out of time leaves raw as it was
        found_by_rule: list[tuple[str, list, int | None, list[bytes]]] = []
        for i, cp in enumerate(self._count_patterns(searched)):  # in fixed_texts' order
            rule = cp.source
            if picked is not None and not picked.found[i]:  # no line starts with its text
                found, hits, index = [], (), None
            elif picked is not None and self._bare_usable(cp):
                with deadline.bound(BUFFER_TIMEOUT):
                    found = cp.bare.findall(data, 0, stop)
                hits = (vetoed_lines(rule.veto, cp.full, data, stop, cp.literals)
                        if found and cp.vetoes else ())
                index = None if cp.bare.groups == 1 else cp.bare.groupindex["addr"] - 1
            else:
                found = deadline.findall(cp.count, cp.fast, data, stop, BUFFER_TIMEOUT)
                hits = self._vetoed(cp, found, data, stop)
                index = cp.count.groupindex["addr"] - 1
            if type(rule) is ConnectionLine:
                result.connection_count += len(found) if self._counts(rule, len(found)) else 0
                continue
            vetoed: list[bytes] = []
            for m, le in hits:
                if picked is None:
                    at, when = le, fmt.parse(m, ref_time)
                else:  # the line's end and stamp in the window
                    at, when = picked.origin(le), _stamp_time(
                        window, picked.origin(m.start()), fmt, ref_time)
                result.events.append(self._classify(
                    rule, m, data, m.start(), le, when, base + at))
                vetoed.append(m["addr"])
            found_by_rule.append((rule.name, found, index, vetoed))
        for name, found, index, vetoed in found_by_rule:
            counter = raw.setdefault(name, Counter())
            # in C, no loop in Python: the addresses themselves, or each hit's one
            counter.update(found if index is None else map(itemgetter(index), found))
            for address_bytes in vetoed:  # each was counted above: none goes below 0
                left = counter[address_bytes] - 1
                if left:
                    counter[address_bytes] = left
                else:
                    del counter[address_bytes]
        return result

    @staticmethod
    def _bare_usable(cp: counting.CountPattern) -> bool:
        """Whether a hit's address alone will do (CountPattern.bare): compiled, bounded by
        a timer (deadline.usable), the ignores (if any) texts vetoed_lines can look for."""
        return (cp.bare is not None and deadline.usable()
                and (not cp.vetoes or cp.literals is not None))

    @staticmethod
    def _vetoed(cp: counting.CountPattern, found: list, data: bytes | bytearray,
                stop: int) -> Iterator[tuple[regex.Match, int]]:
        """The hits in ``found`` (with their tails) that an ignore vetoes."""
        rule = cp.source
        if cp.veto is None or type(rule) is not Rule or rule.veto is None:
            return iter(())
        # Ignores look at the rest of each hit's line: search all of them at once.
        # A look-behind may reach before the tail: then only the full pass is sure.
        texts = None
        if b"(?<" not in rule.veto.pattern:
            tails = list(map(itemgetter(cp.count.groupindex[counting.TAIL] - 1), found))
            texts = {text: tails.count(text)
                     for text in vetoed_tails(tails, rule.veto, cp.literals)}
        return vetoed_hits(rule.veto, cp.full, cp.veto, data, stop, texts)

    def _prefiltered(self, window: bytes | bytearray, stop: int,
                     fmt: StampFormat) -> prefilter.Selection | None:
        """The lines of ``window[1:stop]`` a pattern may match, or None where the
        prefilter cannot tell (rblguard.matching.prefilter.pick)."""
        if not self.use_prefilter:
            return None
        return prefilter.pick(window, stop, fmt.template, self.fixed_texts)

    @functools.cached_property
    def fixed_texts(self) -> tuple[bytes, ...]:
        """The patterns' fixed texts the prefilter picks lines by; empty where it cannot
        (rblguard.matching.prefilter.fixed_texts)."""
        vetoes = [rule.veto.pattern for rule in self.rules if rule.veto is not None]
        return prefilter.fixed_texts([(lit, rest) for _s, lit, rest in self._sources()], vetoes)

    def prepare(self, fmt: StampFormat) -> None:
        """Compile what tally() of ``fmt`` needs now: before a scan forks, not in each."""
        can = self.use_prefilter and prefilter.can_pick(fmt.template, self.fixed_texts)
        for cp in self._count_patterns(NONE if can else fmt):  # NONE: the lines picked
            if not self._bare_usable(cp):  # else needed only where a line is odd
                _ = cp.count, cp.fast, cp.veto  # cached properties: compiled, kept

    def _count_patterns(self, fmt: StampFormat) -> list[counting.CountPattern]:
        """tally()'s patterns for ``fmt`` (rblguard.matching.counting), made once."""
        key = "count:" + fmt.name
        cached = self._compiled.get(key)
        if cached is None:
            stamp = fmt.prefix.pattern if fmt.prefix is not None else b""
            cached = counting.count_patterns(self._sources(), self._patterns(fmt) or [], stamp)
            self._compiled[key] = cached
        return cached

    # -- the line path: syslog, samples, and anything whose message is rebuilt ---------

    def classify_message(self, message: bytes, when: float | None, offset: int) -> Event | None:
        """The event one message gives, or None: the same decision as the fast path.

        A rule that takes longer than LINE_TIMEOUT on this message gives a ParseError
        with reason "timeout" (said once per rule in the log): the line is skipped for
        that rule, and every other line goes on being matched.
        """
        for rule in self.rules:
            try:
                m = rule.regex.match(message, timeout=LINE_TIMEOUT)
                if m is not None and b"\n" not in message[: m.end()]:
                    return self._classify(rule, m, message, 0, len(message), when, offset)
            except TimeoutError:
                return self._timeout(rule, message, when, offset)
        for line in self.connection_lines:
            m = line.regex.match(message, timeout=LINE_TIMEOUT)
            if m is not None:
                address = canonical_address(m.group("addr").decode("ascii", "replace"))
                if address is None or not self._counts(line, 1):
                    return None
                return Connection(address, when, offset, line.name)
        return None

    def _timeout(self, rule: Rule, message: bytes, when: float | None,
                 offset: int) -> ParseError:
        if rule.name not in self._timed_out:
            self._timed_out.add(rule.name)
            warn(__name__, "%s:%d: rule %s took over %.1f s on one line (at byte %d): that "
                 "line is skipped for it; the pattern backtracks catastrophically "
                 "(nested or overlapping repetition, like (\\d+)+ or (a|a)*): "
                 "rewrite it", rule.file, rule.lineno, rule.name, LINE_TIMEOUT,
                 offset - len(message) - 1)
        text = message[:200].decode("utf-8", "replace")
        return ParseError(rule.name, text, when, offset, reason="timeout")

    def _scan_lines(self, buf: bytes, base: int, fmt: StampFormat, ref: float,
                    events: list[Event]) -> None:
        start = 0
        for line in buf.split(b"\n")[:-1]:
            start += len(line) + 1
            m, message = split_message(fmt, line)
            event = self.classify_message(message, None, base + start)
            if event is not None:
                if m is not None:
                    event = event._replace(time=fmt.parse(m, ref))
                events.append(event)


def _usable_addresses(pattern: regex.Pattern, data: bytes) -> int:
    """How many hits of ``pattern`` in ``data`` hold an address (a daemon's read holds
    a few: a plain loop costs less than counting in C would)."""
    n = 0
    cached = BYTES_CACHE.get
    for m in pattern.finditer(data, timeout=BUFFER_TIMEOUT):
        raw = m["addr"]
        if (cached(raw) or canonical_bytes(raw)) is not None:
            n += 1
    return n


def _stamp_time(window: bytes | bytearray, message: int, fmt: StampFormat,
                ref_time: float) -> float | None:
    """The time of the line whose message starts at ``window[message]``, from its
    stamp (of fixed width: the prefilter has checked it)."""
    if fmt.prefix is None or fmt.template is None:  # lines without stamps: no time
        return None
    m = fmt.prefix.match(window, message - len(fmt.template))
    return fmt.parse(m, ref_time) if m is not None else None


def _complete(buf: bytes) -> bytes:
    """``buf`` without a last line that lacks its newline."""
    if buf and buf[-1] != 10:
        return buf[:buf.rfind(b"\n") + 1]
    return buf


def _offset(event: Event) -> int:
    return event.offset
