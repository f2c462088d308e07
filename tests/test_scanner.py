"""The scanner against annotated sample logs: every line states what it must give."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rblguard.addresses import canonical_address, canonical_counts
from rblguard.matching import deadline
from rblguard.matching.rules import load_rules, shipped_rules_dir
from rblguard.matching.scanner import Scanner
from rblguard.matching.sources import scan_file
from rblguard.model import MAX_LINE_BYTES, Connection, Ignored, Match, ParseError
from rblguard.sources.files import read_complete_lines, read_windows
from rblguard.sources.stamps import FORMATS, NONE, TAI64_UNIX_OFFSET, TAI64N, detect_format

FIXTURES = Path(__file__).parent / "fixtures" / "logs"
ANNOTATION = re.compile(
    r"^#> (ban|ignored|parse-error|connection|none)(?: (\S+))?(?: time=(\S+))?$"
)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(scope="module")
def ruleset():
    return load_rules([shipped_rules_dir()])


def _load_fixture(path: Path, out: Path) -> list[tuple[str, str | None, float | None]]:
    """Write the fixture's log lines to ``out``; return each line's expectation."""
    expected: list[tuple[str, str | None, float | None]] = []
    lines: list[str] = []
    pending = None
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.startswith("#>"):
            m = ANNOTATION.match(text)
            assert m, f"{path.name}:{number}: bad annotation {text!r}"
            pending = (m.group(1), m.group(2), float(m.group(3)) if m.group(3) else None)
        elif text.startswith("#"):
            continue
        else:
            assert pending is not None, f"{path.name}:{number}: log line without annotation"
            expected.append(pending)
            lines.append(text)
            pending = None
    out.write_text("\n".join(lines) + "\n")
    os.utime(out, (1717200000, 1717200000))  # 2024-06-01: syslog's year comes from here
    return expected


def _outcome(event) -> tuple[str, str | None, float | None]:
    if isinstance(event, Match):
        return "ban", event.address, event.time
    if isinstance(event, Ignored):
        return "ignored", event.reason, event.time
    if isinstance(event, ParseError):
        return "parse-error", None, event.time
    assert isinstance(event, Connection)
    return "connection", event.address, event.time


@pytest.mark.parametrize("fixture", sorted(FIXTURES.glob("*.log")), ids=lambda p: p.name)
def test_annotated_fixture(fixture: Path, tmp_path: Path, ruleset) -> None:
    log = tmp_path / "log"
    expected = _load_fixture(fixture, log)
    data = log.read_bytes()
    line_ends = [m.end() for m in re.finditer(rb"\n", data)]
    got: dict[int, tuple] = {}
    for chunk in scan_file(log, Scanner(ruleset)):
        for event in chunk.events:
            index = line_ends.index(event.offset)
            assert index not in got, f"line {index + 1} gave two events"
            got[index] = _outcome(event)
    for index, (outcome, value, when) in enumerate(expected):
        actual = got.get(index, ("none", None, None))
        assert actual[0] == outcome, f"{fixture.name}: log line {index + 1}: {actual}"
        if value is not None:
            assert actual[1] == value, f"{fixture.name}: log line {index + 1}: {actual}"
        if when is not None:
            assert actual[2] == pytest.approx(when, abs=1e-6), f"line {index + 1}: {actual}"


def test_every_fixture_format_is_detected() -> None:
    def log_lines(path: Path) -> bytes:
        return b"".join(line for line in path.read_bytes().splitlines(keepends=True)
                        if not line.startswith(b"#"))

    names = {p.name: detect_format(log_lines(p)).name for p in FIXTURES.glob("*.log")}
    assert names["multilog-tai64n.log"] == "tai64n"
    assert names["tai64nlocal.log"] == "tai64nlocal"
    assert names["syslog.log"] == "syslog"
    assert names["rfc3339.log"] == "rfc3339"


def test_incomplete_last_line_is_not_read(tmp_path: Path) -> None:
    log = tmp_path / "current"
    log.write_bytes(b"a\nb\npartial")
    assert list(read_complete_lines(log)) == [(0, b"a\nb\n")]
    log.write_bytes(b"a\nb\npartial line\n")
    assert list(read_complete_lines(log, start=4)) == [(4, b"partial line\n")]


def test_long_lines_nul_bytes_and_bad_utf8(tmp_path: Path, ruleset) -> None:
    stamp = b"@4000000065a1d28a302953e2 "
    long_line = stamp + b"qmail-smtpd: " + b"x\x00\xff" * 300_000
    reject = stamp + b"rblsmtpd: 198.18.7.7 pid 1: 553 \xff\xfe bad utf-8 \x00 nul\n"
    log = tmp_path / "current"
    log.write_bytes(long_line + b"\n" + reject + long_line)  # last line incomplete
    chunks = list(read_complete_lines(log, chunk_size=65536))
    assert b"".join(c for _, c in chunks) == long_line + b"\n" + reject
    events = [e for c in scan_file(log, Scanner(ruleset)) for e in c.events]
    assert [(type(e), e.address) for e in events] == [(Match, "198.18.7.7")]
    assert "\ufffd" in events[0].line


def test_a_line_past_the_cap_is_skipped_whole(tmp_path: Path, ruleset) -> None:
    stamp = b"@4000000065a1d28a302953e2 "
    reject = stamp + b"rblsmtpd: 198.18.7.7 pid 1: 553 listed\n"
    # The overlong line ends like a reject: were only its head dropped, its tail would ban.
    overlong = b"x" * (2 * MAX_LINE_BYTES) + b" " + reject
    log = tmp_path / "current"
    log.write_bytes(reject + overlong + reject.replace(b".7.7", b".7.8"))
    chunks = list(read_complete_lines(log, chunk_size=65536))
    assert [c for _, c in chunks] == [reject, reject.replace(b".7.7", b".7.8")]
    assert chunks[1][0] == len(reject) + len(overlong), "offsets stay file offsets"
    events = [e for c in scan_file(log, Scanner(ruleset)) for e in c.events]
    assert [e.address for e in events] == ["198.18.7.7", "198.18.7.8"]


def test_hit_inside_client_text_is_never_a_ban(ruleset) -> None:
    hostile = (b"@4000000065a1d28a302953e2 qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x\n"
               b"@4000000065a1d28a302953e2 qmail-smtpd: rblsmtpd: 203.0.113.9 pid 1: 553 x\n")
    result = Scanner(ruleset).scan(hostile, 0, TAI64N, 0)
    assert result.events == []
    assert result.lines == 2


LINE_START = b"@4000000065a1d28a302953e2 "


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=30))
def test_arbitrary_bytes_never_raise_and_ban_only_the_lines_own_address(chunks) -> None:
    """Whatever the bytes, a ban names the address right after the line's own prefix."""
    ruleset = load_rules([shipped_rules_dir()])
    buf = b"".join(LINE_START + c.replace(b"\n", b" ") + b"\n" for c in chunks)
    result = Scanner(ruleset).scan(buf, 0, TAI64N, 0)
    lines = buf.split(b"\n")
    ends = {}
    pos = 0
    for line in lines[:-1]:
        pos += len(line) + 1
        ends[pos] = line
    for event in result.events:
        line = ends[event.offset]
        if isinstance(event, Match):
            m = re.match(rb"@[0-9a-f]{24} rblsmtpd: ([^\s,;]+) pid \d+: (451|553) ", line)
            assert m, line
            assert event.address == canonical_address(m.group(1).decode("ascii", "replace"))


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b),
       address=st.sampled_from(["203.0.113.9", "2001:db8::9", "::ffff:203.0.113.9"]))
def test_injected_reject_after_any_prefix_never_bans(prefix, address) -> None:
    ruleset = load_rules([shipped_rules_dir()])
    line = LINE_START + prefix + f"rblsmtpd: {address} pid 1: 553 x\n".encode()
    result = Scanner(ruleset).scan(line, 0, TAI64N, 0)
    assert not [e for e in result.events if isinstance(e, Match)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([
    b"rblsmtpd: 198.18.5.124 pid 7: 451 https://www.spamhaus.org/query/ip/198.18.5.124",
    b"rblsmtpd: ::ffff:198.18.5.124 pid 8: 553 listed",
    b"rblsmtpd: 2001:db8::1 pid 9: 553 listed",
    b"rblsmtpd: 198.18.5.125 pid 7: 451 temporary RBL lookup error",
    b"rblsmtpd: 198.18.5.126 pid 7: 451 Error: open resolver; https://x.example/returnc/",
    b"rblsmtpd: 198.18.999.1 pid 7: 553 listed",
    b"rblsmtpd: 198.18.5.128/returnc/ pid 7: 553 listed",  # an ignore's text, not in the tail
    b"qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x",
    b"tcpserver: pid 7 from 198.18.5.124",
    b"tcpserver: pid 8 from ::ffff:198.18.5.127",
    b"qmail-smtpd[70]: rbl: ip=198.18.5.129 query=129.5.18.198.zen.spamhaus.org "
    b"result=reject message='listed'",
    b"qmail-smtpd[71]: rbl: ip=198.18.5.130 query=130.5.18.198.zen.spamhaus.org "
    b"result=dnserr message='temporary RBL lookup error'",
]), max_size=40))
def test_tally_counts_what_scan_finds(lines) -> None:
    """`rblguard scan` counts with tally(); the daemon acts on scan(): they must agree,
    whether tally() searches whole windows or the lines the prefilter picked (where a
    rule whose fixed text starts none of them is not searched at all)."""
    buf = b"".join(LINE_START + line + b"\n" for line in lines)
    scanner = Scanner(load_rules([shipped_rules_dir()]))
    events = scanner.scan(buf, 0, TAI64N, 0).events
    counted = scanner.tally(buf, 0, TAI64N, 0)
    assert scanner.fixed_texts, "the shipped rules are prefiltered"
    whole = Scanner(load_rules([shipped_rules_dir()]), use_prefilter=False).tally(
        buf, 0, TAI64N, 0)
    assert (counted.lines, counted.match_counts, counted.connection_count, counted.events) \
        == (whole.lines, whole.match_counts, whole.connection_count, whole.events)
    matches: dict[tuple[str, str], int] = {}
    for e in events:
        if isinstance(e, Match):
            matches[(e.rule, e.address)] = matches.get((e.rule, e.address), 0) + 1
    assert (counted.match_counts or {}) == matches
    assert counted.connection_count == sum(isinstance(e, Connection) for e in events)
    assert sorted(type(e).__name__ for e in counted.events) == sorted(
        type(e).__name__ for e in events if isinstance(e, Ignored | ParseError))


# -- lines that cross: a rule's match must stay inside its own line -------------------

CROSSING_RULE = (Path(__file__).parent / "fixtures" / "rules" / "crossing-lines.yaml").read_text()
TWO_LINES = [b"qmail-dnsbl: rejected code 553", b"qmail-smtpd: HELO ip=203.0.113.9"]


@pytest.fixture()
def crossing_rules(tmp_path: Path):
    (tmp_path / "dnsbl.yaml").write_text(CROSSING_RULE)
    return load_rules([tmp_path])


@pytest.mark.parametrize("stamp", [b"", LINE_START], ids=["none", "tai64n"])
def test_a_match_never_crosses_into_the_next_line(crossing_rules, stamp) -> None:
    """The next line's client text must never give the address of a reject."""
    fmt = TAI64N if stamp else detect_format(b"x\n")
    buf = b"".join(stamp + line + b"\n" for line in TWO_LINES)
    scanner = Scanner(crossing_rules)
    assert scanner.scan(buf, 0, fmt, 0).events == []
    counted = scanner.tally(buf, 0, fmt, 0)
    assert not counted.match_counts and counted.events == []
    # The rule still works on a line of its own, in either path.
    own = stamp + b"qmail-dnsbl: rejected code 553 ip=198.18.0.1\n"
    for result in (scanner.scan(buf + own, 0, fmt, 0), scanner.scan(own + buf, 0, fmt, 0)):
        assert [(type(e), e.address) for e in result.events] == [(Match, "198.18.0.1")]
    assert scanner.tally(buf + own, 0, fmt, 0).match_counts == {("dnsbl", "198.18.0.1"): 1}


def test_a_match_never_takes_the_newline(tmp_path: Path) -> None:
    """``\\s`` at the end of a pattern must not be satisfied by the line's newline: the
    line path (syslog, samples) never sees one, so both paths must say no."""
    (tmp_path / "r.yaml").write_text(
        "rules:\n  - name: r\n    match: 'rblsmtpd: <ADDR> pid \\d+: 553\\s'\n")
    scanner = Scanner(load_rules([tmp_path]))
    buf = LINE_START + b"rblsmtpd: 198.18.0.1 pid 1: 553\n"
    assert scanner.scan(buf, 0, TAI64N, 0).events == []
    assert scanner.classify_message(b"rblsmtpd: 198.18.0.1 pid 1: 553", None, 0) is None
    assert scanner.scan(buf[:-1] + b" x\n", 0, TAI64N, 0).events[0].address == "198.18.0.1"


def test_an_incomplete_last_line_gives_nothing(ruleset) -> None:
    line = LINE_START + b"rblsmtpd: 198.18.0.1 pid 1: 553 listed"
    scanner = Scanner(ruleset)
    result = scanner.scan(line + b"\n" + line, 0, TAI64N, 0)
    assert [(e.address, e.offset) for e in result.events] == [("198.18.0.1", len(line) + 1)]
    assert result.end_offset == len(line) + 1 and result.lines == 1
    counted = scanner.tally(line + b"\n" + line, 0, TAI64N, 0)
    assert counted.match_counts == {("rblsmtpd", "198.18.0.1"): 1}
    assert scanner.scan(line, 0, TAI64N, 0).events == []


# -- a grammar of log lines: every ban names exactly the line's own address ---------

_OTHER = "203.0.113.66"
_HOSTS = st.sampled_from(["mx1", "mail.example.net", "a-b.c", "x"])


@st.composite
def _address(draw) -> tuple[str, str]:
    """(spelling in the log, canonical form) of a valid client address."""
    kind = draw(st.sampled_from(["v4", "v6", "mapped"]))
    if kind == "v4":
        v4 = draw(st.ip_addresses(v=4))
        return str(v4), str(v4)
    if kind == "mapped":
        v4 = draw(st.ip_addresses(v=4))
        spelling = draw(st.sampled_from(["::ffff:{}", "::FFFF:{}", "0:0:0:0:0:ffff:{}"]))
        return spelling.format(v4), str(v4)
    v6 = draw(st.ip_addresses(v=6))
    spelling = draw(st.sampled_from([v6.compressed, v6.exploded, v6.compressed.upper()]))
    canonical = str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else v6.compressed
    return spelling, canonical


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(
    st.one_of(_address().map(lambda a: a[0]),
              st.sampled_from(["::ffff:1.2.3.999", "01.2.3.4", "::ffff:01.2.3.4",
                               "[2001:db8::1]", "fe80::1%eth0", "x", "1.2.3", "::1.2.3.4",
                               "::ffff:1.2.3.4:5", "::fffff:1.2.3.4", "1.2.3.4\n5.6.7.8",
                               "1.2.3.4", "::ffff:1.2.3.4", "1.2.3.\xe9"])),
    st.integers(-2, 5), max_size=30))
def test_canonical_counts_is_canonical_address_of_each(found: dict[str, int]) -> None:
    """scan resolves its distinct addresses in one batch: the counts must be those of
    resolving each spelling on its own and adding up by canonical address (two
    spellings of one client are one offender), with counts of 0 or less left out and
    the spellings that are no address counted apart."""
    want: dict[str, int] = {}
    bad: dict[bytes, int] = {}
    for spelling, n in found.items():
        if n <= 0:
            continue
        address = canonical_address(spelling)
        if address is None:
            bad[spelling.encode()] = n
        else:
            want[address] = want.get(address, 0) + n
    assert canonical_counts({s.encode(): n for s, n in found.items()}) == (want, bad)


@st.composite
def _stamp(draw, fmt: str, tag: str) -> bytes:
    """A valid stamp of ``fmt``; for syslog formats the header with ``tag``."""
    seconds = draw(st.integers(0, 2**31 - 1))
    ns = draw(st.integers(0, 999_999_999))
    tm = time.gmtime(seconds)
    if fmt == "tai64n":
        return f"@{TAI64_UNIX_OFFSET + seconds:016x}{ns:08x} ".encode()
    if fmt == "tai64nlocal":
        return f"{time.strftime('%Y-%m-%d %H:%M:%S', tm)}.{ns:09d} ".encode()
    if fmt == "none":
        return b""
    if fmt == "exim":
        frac = draw(st.sampled_from(["", f".{ns % 1000:03d}"]))
        zone = draw(st.sampled_from(["", " +0100", " -0530"]))
        pid = draw(st.sampled_from(["", f" [{ns % 65536}]"]))
        return f"{time.strftime('%Y-%m-%d %H:%M:%S', tm)}{frac}{zone}{pid} ".encode()
    host = draw(_HOSTS)
    pid = draw(st.sampled_from(["", f"[{ns % 65536}]"]))
    pri = draw(st.sampled_from(["", "<13>"]))
    if fmt == "syslog":
        return f"{pri}{time.strftime('%b %e %H:%M:%S', tm)} {host} {tag}{pid}: ".encode()
    frac = draw(st.sampled_from(["", f".{ns:09d}"[:draw(st.integers(2, 10))]]))
    zone = draw(st.sampled_from(["Z", "+01:00", "-0530"]))
    version = "1 " if pri and draw(st.booleans()) else ""
    return (f"{pri}{version}{time.strftime('%Y-%m-%dT%H:%M:%S', tm)}{frac}{zone} "
            f"{host} {tag}{pid}: ").encode()


def _client_text(draw) -> bytes:
    """Text a client (or a DNSBL) chose: random bytes and reject-looking pieces that
    carry other addresses."""
    pieces = draw(st.lists(st.one_of(
        st.binary(max_size=20),
        st.builds(lambda a: f"rblsmtpd: {a[0]} pid 1: 553 x".encode(), _address()),
        st.builds(lambda a: f" ip={a[0]}".encode(), _address()),
        st.builds(lambda a: f"\r@4000000065a1d28a302953e2 rblsmtpd: {a[0]} pid 2: 451 ".encode(),
                  _address()),
        st.sampled_from([b"https://www.spamhaus.org/query/ip/" + _OTHER.encode(),
                         b"temporary RBL lookup error", b"Error: open resolver",
                         b"https://check.spamhaus.org/returnc/pub/", b"\x00\xff ;,"]),
    ), max_size=5))
    return b"".join(pieces).replace(b"\n", b" ")


@st.composite
def _line(draw, fmt: str) -> tuple[bytes, tuple | None]:
    """One log line of ``fmt`` and what it must give."""
    syslog = fmt in ("syslog", "rfc3339")
    kind = draw(st.sampled_from(["reject", "reject", "hostile", "junk", "unstamped",
                                 "greetdelay", "parse-error", "connection"]))
    spelling, canonical = draw(_address())
    pid = draw(st.integers(1, 99999))
    if kind in ("reject", "greetdelay", "parse-error"):
        if kind == "parse-error":
            spelling = draw(st.sampled_from(["198.18.300.1", "fe80::1%eth0", "1.2.3", "x"]))
        tail = _client_text(draw)
        code = draw(st.sampled_from(["451", "553"]))
        text = (f"{spelling} pid {pid}: " + (f"{code} " if kind != "greetdelay"
                                              else "greetdelay: 15")).encode()
        text += tail if kind != "greetdelay" else b""
        own_tag = syslog and draw(st.booleans())  # syslog: tag rblsmtpd, or a generic one
        stamp = draw(_stamp(fmt, "rblsmtpd" if own_tag else "qmail"))
        line = stamp + (text if own_tag else b"rblsmtpd: " + text)
        if kind == "greetdelay":
            return line, None
        own = None if kind == "parse-error" else canonical  # an ignore vetoes either
        if b"temporary RBL lookup error" in tail:
            return line, ("ignored", "lookup-error", own)
        if b"Error:" in tail or b"/returnc/" in tail:
            return line, ("ignored", "dnsbl-error", own)
        return line, ("parse-error", None) if kind == "parse-error" else ("ban", canonical)
    if kind == "connection":
        stamp = draw(_stamp(fmt, "tcpserver"))
        text = f"pid {pid} from {spelling}".encode()
        return stamp + (text if syslog else b"tcpserver: " + text), ("connection", canonical)
    if kind == "hostile":  # another program's line holding a reject a client wrote
        lead = draw(st.sampled_from([b"HELO ", b"mail from <", b"CHKUSER rejected rcpt: ",
                                     b"simscan subject "]))
        body = lead + f"rblsmtpd: {spelling} pid {pid}: 553 x".encode() + _client_text(draw)
        stamp = draw(_stamp(fmt, "qmail-smtpd"))
        return stamp + (body if syslog else b"qmail-smtpd: " + body), None
    junk = draw(st.binary(max_size=60)).replace(b"\n", b" ")
    if kind == "unstamped":  # no stamp of this format: nothing in it is trusted
        return b"#" + junk, None
    return draw(_stamp(fmt, "junk")) + (b"x" if syslog else b"junk: ") + junk, None


@st.composite
def _log(draw, fmt: str) -> tuple[bytes, list[tuple | None], int]:
    """A buffer of lines, their expectations, and the number of complete lines."""
    lines = draw(st.lists(_line(fmt), max_size=25))
    buf = b"".join(line + b"\n" for line, _ in lines)
    complete = len(lines)
    if lines and draw(st.booleans()):  # the last line's newline is not written yet
        buf, complete = buf[:-1], len(lines) - 1
    return buf, [want for _, want in lines], complete


_GRAMMAR_FORMATS = {f.name: f for f in (*FORMATS, NONE)}


@pytest.mark.parametrize("fmt_name", sorted(_GRAMMAR_FORMATS))
def test_every_ban_is_the_lines_own_address(fmt_name: str, ruleset) -> None:
    """Lines from a grammar (each stamp format, real rblsmtpd prefixes with IPv4, IPv6 and
    IPv4-mapped addresses, client text full of other rejects, junk, a last line without
    its newline): each reject line gives exactly one Match, of exactly its own address,
    nothing else bans, and scan(), tally() and the line path agree."""
    fmt = _GRAMMAR_FORMATS[fmt_name]
    scanner = Scanner(ruleset)

    @settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(_log(fmt_name))
    def check(log) -> None:
        buf, wants, complete = log
        ends = list(itertools.accumulate(len(line) + 1 for line in buf.split(b"\n")))
        index = {end: i for i, end in enumerate(ends[:complete])}
        result = scanner.scan(buf, 0, fmt, 1717200000)
        got: dict[int, object] = {}
        for event in result.events:
            assert event.offset in index, f"an event at no complete line's end: {event}"
            assert index[event.offset] not in got, f"a line gave two events: {event}"
            got[index[event.offset]] = event
        for i, want in enumerate(wants):
            event = got.get(i)
            if i >= complete or want is None:
                assert event is None, f"line {i + 1} must give nothing: {event}"
            elif want[0] == "ban":
                assert isinstance(event, Match) and event.address == want[1], (i, want, event)
            elif want[0] == "ignored":
                assert isinstance(event, Ignored), (i, want, event)
                assert (event.reason, event.address) == want[1:]
            elif want[0] == "parse-error":
                assert isinstance(event, ParseError), (i, want, event)
            else:
                assert isinstance(event, Connection) and event.address == want[1], (i, event)
        # the line path (syslog's, and test-rules' samples) decides the same
        per_line: list = []
        scanner._scan_lines(buf if buf.endswith(b"\n") else buf[:buf.rfind(b"\n") + 1],
                            0, fmt, 1717200000, per_line)
        assert [(type(e), getattr(e, "address", None), e.offset) for e in per_line] == [
            (type(e), getattr(e, "address", None), e.offset) for e in result.events]
        # and `rblguard scan`'s counting agrees with what the daemon acts on
        counted = scanner.tally(buf, 0, fmt, 1717200000)
        bans = Counter(("rblsmtpd", e.address) for e in result.events if isinstance(e, Match))
        assert Counter(counted.match_counts or {}) == bans
        assert counted.connection_count == sum(isinstance(e, Connection) for e in result.events)
        assert Counter((type(e).__name__, getattr(e, "address", None)) for e in counted.events
                       if not isinstance(e, ParseError)) == Counter(
            (type(e).__name__, e.address) for e in result.events if isinstance(e, Ignored))
        assert sum(isinstance(e, ParseError) for e in counted.events) == sum(
            isinstance(e, ParseError) for e in result.events)

    check()


# -- ignores that the fast count cannot judge from a hit's tail alone --------------------

HARD_IGNORES = r"""
description: ignores with a look-behind before the tail, and with many distinct texts
rules:
  - name: rbl
    match: 'rblsmtpd: <ADDR> pid \d+: (?:451|553) '
    ignore:
      - name: dnsbl-error
        match: '(?<=553 )Error:'
      - name: numbered
        match: 'code-\d+'
samples:
  - line: 'rblsmtpd: 198.18.0.1 pid 1: 553 listed'
    ban: 198.18.0.1
  - line: 'rblsmtpd: 198.18.0.2 pid 1: 553 Error: open resolver'
    ignored: dnsbl-error
  - line: 'rblsmtpd: 198.18.0.3 pid 1: 451 code-17'
    ignored: numbered
  - line: 'qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x'
    none: client text
"""


@pytest.mark.parametrize("texts", [
    (b"listed", b"Error: open resolver", b"see Error: later"),  # the look-behind alone
    (b"listed", b"code-%d", b"listed", b"code-%d"),  # 100 distinct vetoed texts
], ids=["look-behind", "many-texts"])
def test_tally_vetoes_what_scan_vetoes(tmp_path: Path, texts: tuple[bytes, ...]) -> None:
    """tally() finds vetoed hits from the texts in their tails; an ignore whose
    look-behind reaches before the tail, or many distinct vetoed texts, must still veto
    exactly what scan() vetoes: an error reply is never counted as a reject."""
    (tmp_path / "hard.yaml").write_text(HARD_IGNORES)
    scanner = Scanner(load_rules([tmp_path]))
    buf = b"".join(LINE_START + b"rblsmtpd: 198.18.%d.%d pid 7: 553 %s\n" % (
        i // 250, i % 250, texts[i % len(texts)].replace(b"%d", b"%d" % i))
        for i in range(300))
    events = scanner.scan(buf, 0, TAI64N, 0).events
    vetoed = sorted((e.address, e.offset, e.line) for e in events if isinstance(e, Ignored))
    assert len(vetoed) in (100, 150)
    for use_prefilter in (False, True):  # whole windows, and the prefilter's lines
        scanner.use_prefilter = use_prefilter
        counted = scanner.tally(buf, 0, TAI64N, 0)
        assert sorted((e.address, e.offset, e.line)
                      for e in counted.events if isinstance(e, Ignored)) == vetoed
    banned = {e.address for e in events if isinstance(e, Match)}
    assert {a for _rule, a in counted.match_counts or {}} == banned


@given(lines=st.lists(st.sampled_from([0, 1, 7, 60, 300, 5000]), max_size=40),
       partial=st.booleans(), size=st.sampled_from([16, 100, 4096]),
       cut_at=st.floats(0, 1))
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_windows_hold_every_complete_line_once(tmp_path: Path, lines, partial, size,
                                               cut_at) -> None:
    """read_windows() gives each complete line once, at its offset, whatever the window
    size, whether the file is read whole or in two ranges cut at a line boundary; a
    last line without its newline is left out."""
    body = b"".join(bytes([97 + i % 26]) * n + b"\n" for i, n in enumerate(lines))
    log = tmp_path / "current"
    log.write_bytes(body + (b"partial" if partial else b""))
    want, pos = [], 0
    for line in body.split(b"\n")[:-1]:
        want.append((pos, line))
        pos += len(line) + 1

    def lines_of(windows) -> list[tuple[int, bytes]]:
        out = []
        for offset, window, stop in windows:
            assert window[0:1] == b"\n", "a newline stands before the first line"
            for line in bytes(window[1:stop]).split(b"\n")[:-1]:
                out.append((offset, line))
                offset += len(line) + 1
        return out

    assert lines_of(read_windows(log, size=size)) == want
    cut = body.find(b"\n", int(len(body) * cut_at)) + 1
    if cut:
        assert (lines_of(read_windows(log, 0, cut, size=size))
                + lines_of(read_windows(log, cut, None, size=size))) == want


def test_windows_skip_a_line_past_the_cap_whole(tmp_path: Path) -> None:
    kept = b"k" * MAX_LINE_BYTES + b"\n"  # exactly the cap: kept
    log = tmp_path / "current"
    log.write_bytes(b"a\n" + b"x" * (MAX_LINE_BYTES + 1) + b"\n" + kept + b"b\n")
    got = [(o, line) for o, w, stop in read_windows(log, size=4096)
           for line in bytes(w[1:stop]).split(b"\n")[:-1]]
    assert [line[:1] for _, line in got] == [b"a", b"k", b"b"]
    assert got[1][0] == 2 + MAX_LINE_BYTES + 2, "offsets stay file offsets"


def test_a_time_bound_stops_a_catastrophic_re_search() -> None:
    """The standard library's re has no timeout; deadline.bound() gives it one."""
    import signal

    before = signal.getsignal(signal.SIGALRM)
    slow = re.compile(rb"(\d+)+x$")
    start = time.monotonic()
    with pytest.raises(TimeoutError), deadline.bound(0.2):
        slow.match(b"1" * 60)
    assert time.monotonic() - start < 5
    assert signal.getsignal(signal.SIGALRM) is before
    with deadline.bound(5):  # a quick search under a bound is just a search
        assert slow.match(b"12x") is not None


@pytest.mark.parametrize("fmt", ["tai64n", "tai64nlocal", "rfc3339", "none", "syslog"])
def test_counted_connections_are_the_connection_events(fmt: str, tmp_path: Path) -> None:
    """The daemon's scanner counts connection lines instead of making an event each
    (its metrics need only the count): the same count, and the same other events,
    as the scanner simulate uses, on every stamp format and with hostile lines."""
    from benchmarks import genlog

    log = tmp_path / "current"
    truth = genlog.write_log(log, fmt, 7, lines=20_000)
    ruleset = load_rules()
    evented, counted = Scanner(ruleset), Scanner(ruleset, connection_events=False)
    events, others, count = 0, [], 0
    for chunk in scan_file(log, evented):
        events += sum(1 for e in chunk.events if type(e) is Connection)
        others += [e for e in chunk.events if type(e) is not Connection]
    rest = []
    for chunk in scan_file(log, counted):
        count += chunk.connection_count + sum(1 for e in chunk.events if type(e) is Connection)
        rest += [e for e in chunk.events if type(e) is not Connection]
    assert count == events == truth.connections
    assert rest == others
