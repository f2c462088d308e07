"""The scanner against annotated sample logs: every line states what it must give."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rblguard.model import Connection, Ignored, Match, ParseError
from rblguard.rules import load_rules, shipped_rules_dir
from rblguard.scanner import Scanner, read_complete_lines, scan_file
from rblguard.stamps import TAI64N, detect_format

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
    long_line = stamp + b"qmail-smtpd: " + b"x\x00\xff" * 400_000
    reject = stamp + b"rblsmtpd: 198.18.7.7 pid 1: 553 \xff\xfe bad utf-8 \x00 nul\n"
    log = tmp_path / "current"
    log.write_bytes(long_line + b"\n" + reject + long_line)  # last line incomplete
    chunks = list(read_complete_lines(log, chunk_size=65536))
    assert b"".join(c for _, c in chunks) == long_line + b"\n" + reject
    events = [e for c in scan_file(log, Scanner(ruleset)) for e in c.events]
    assert [(type(e), e.address) for e in events] == [(Match, "198.18.7.7")]
    assert "\ufffd" in events[0].line


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
            assert event.address is not None


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
    b"qmail-smtpd: HELO rblsmtpd: 203.0.113.9 pid 1: 553 x",
    b"tcpserver: pid 7 from 198.18.5.124",
    b"tcpserver: pid 8 from ::ffff:198.18.5.127",
]), max_size=40))
def test_tally_counts_what_scan_finds(lines) -> None:
    """`rblguard scan` counts with tally(); the daemon acts on scan(): they must agree."""
    buf = b"".join(LINE_START + line + b"\n" for line in lines)
    scanner = Scanner(load_rules([shipped_rules_dir()]))
    events = scanner.scan(buf, 0, TAI64N, 0).events
    counted = scanner.tally(buf, 0, TAI64N, 0)
    matches: dict[tuple[str, str], int] = {}
    for e in events:
        if isinstance(e, Match):
            matches[(e.rule, e.address)] = matches.get((e.rule, e.address), 0) + 1
    assert (counted.match_counts or {}) == matches
    assert counted.connection_count == sum(isinstance(e, Connection) for e in events)
    assert sorted(type(e).__name__ for e in counted.events) == sorted(
        type(e).__name__ for e in events if isinstance(e, Ignored | ParseError))
