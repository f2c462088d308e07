"""Line stamps: what comes before the message, and the time it tells.

A qmail log line is a stamp followed by a message.  The stamp is multilog's TAI64N
label, ``tai64nlocal``'s local time, a syslog header (RFC 3164 or RFC 3339, which is
also ``journalctl -o short-iso``), Exim's mainlog stamp, or nothing.
One file keeps one format, so the format is detected once per file from its first
complete lines, and every rule match is then anchored at the message start that the
format defines: text a client chose later in a line can never look like a reject.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

TAI64_UNIX_OFFSET = 4611686018427387914  # 2**62 + 10: TAI64 label of the Unix epoch

_TAI64N = re.compile(rb"@([0-9a-f]{16})([0-9a-f]{8}) ")
# tai64nlocal always writes nanoseconds: nine digits, so the stamp has a fixed width.
_TAI64NLOCAL = re.compile(rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(\.\d{9}) ")
_RFC3164 = re.compile(
    rb"(?:<\d{1,3}>)?([A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d) \S+ ([^\s:\[\]]+)(?:\[\d+\])?: "
)
_RFC3339 = re.compile(
    rb"(?:<\d{1,3}>)?(?:1 )?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d{1,9})?(Z|[+-]\d\d:?\d\d) "
    rb"\S+ ([^\s:\[\]]+)(?:\[\d+\])?: "
)
# Exim's mainlog: local "YYYY-MM-DD HH:MM:SS", with log_selector +millisec a ".mmm",
# with +timezone a "+hhmm", with +pid a "[pid]" (Exim's log.c).
_EXIM = re.compile(
    rb"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(\.\d{3})?( [+-]\d{4})?(?: \[\d+\])? "
)
# A program that prefixes its own lines ("rblsmtpd: ...", "tcpserver: ...").
_OWN_PREFIX = re.compile(rb"[\w.-]+: ")
# qmail's splogger starts each message with its own seconds.microseconds stamp
# ("qmail: 1157520813.485077 rblsmtpd: ..."): qmail's splogger.c.
_SPLOGGER = re.compile(rb"\d{9,10}\.\d{6} ")

_MONTHS = {m.encode(): i for i, m in enumerate(calendar.month_abbr) if m}


class StampFormat(NamedTuple):
    """How one file's lines are stamped.

    ``prefix`` matches a line's stamp (and syslog header) at the line start; its groups
    1 and 2 are what ``parse`` reads the time from, so the scanner can put the prefix in
    front of a rule's pattern and read the time from the one combined match.  ``syslog``
    formats rebuild the message as ``TAG: text`` so that rules see what multilog would
    show; they are matched line by line.
    """

    name: str
    prefix: re.Pattern[bytes] | None
    syslog: bool
    parse: Callable[[re.Match[bytes], float], float | None]
    # Where every line's stamp has the same width: the stamp byte by byte ("x" a
    # lower-case hex digit, "d" a decimal digit, any other byte itself), exactly what
    # ``prefix`` matches.  The scanner's prefilter checks stamps by it, and looks for
    # the rules' fixed texts right after (rblguard.matching.prefilter).
    template: bytes | None = None


def _parse_tai64n(m: re.Match[bytes], _ref: float) -> float:
    return int(m.group(1), 16) - TAI64_UNIX_OFFSET + int(m.group(2), 16) / 1e9


_local_cache: dict[bytes, float] = {}


def _local_seconds(text: bytes) -> float:
    """Unix time of a local ``YYYY-MM-DD HH:MM:SS``; cached, as log seconds repeat."""
    seconds = _local_cache.get(text)
    if seconds is None:
        if len(_local_cache) > 4096:
            _local_cache.clear()
        seconds = time.mktime(time.strptime(text.decode(), "%Y-%m-%d %H:%M:%S"))
        _local_cache[text] = seconds
    return seconds


def _parse_tai64nlocal(m: re.Match[bytes], _ref: float) -> float | None:
    try:
        seconds = _local_seconds(m.group(1))
    except (ValueError, OverflowError):
        return None
    fraction = m.group(2)
    return seconds + (float(fraction) if fraction else 0.0)


_rfc3164_cache: dict[tuple[bytes, int], float | None] = {}


def _parse_rfc3164(m: re.Match[bytes], ref: float) -> float | None:
    """Syslog omits the year: take the reference time's, or the year before when the
    line would otherwise lie more than a day in the future (a log crossing New Year).
    Cached per stamp text: a busy log repeats each second many times."""
    key = (m.group(1), int(ref) // 3600)
    when = _rfc3164_cache.get(key)
    if when is None:
        if len(_rfc3164_cache) > 4096:
            _rfc3164_cache.clear()
        when = _rfc3164_cache[key] = _rfc3164_time(m.group(1), ref)
    return when


def _rfc3164_time(stamp: bytes, ref: float) -> float | None:
    month = _MONTHS.get(stamp[:3])
    if month is None:
        return None
    year = time.localtime(ref).tm_year
    try:
        day, clock = int(stamp[4:6]), stamp[7:15].decode()
        hh, mm, ss = (int(x) for x in clock.split(":"))
        when = time.mktime((year, month, day, hh, mm, ss, 0, 0, -1))
        if when > ref + 86400:
            when = time.mktime((year - 1, month, day, hh, mm, ss, 0, 0, -1))
    except (ValueError, OverflowError):
        return None
    return when


def _parse_exim(m: re.Match[bytes], _ref: float) -> float | None:
    """Local time, or the stated zone's when +timezone is logged."""
    try:
        if m.group(3) is None:
            seconds = _local_seconds(m.group(1))
        else:
            zone = m.group(3)[1:]
            offset = (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60) * (
                1 if zone[:1] == b"+" else -1)
            seconds = calendar.timegm(time.strptime(m.group(1).decode(),
                                                    "%Y-%m-%d %H:%M:%S")) - offset
    except (ValueError, OverflowError):
        return None
    return seconds + (float(m.group(2)) if m.group(2) else 0.0)


def _parse_rfc3339(m: re.Match[bytes], _ref: float) -> float | None:
    try:
        base = calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None
    fraction = float(m.group(2)) if m.group(2) else 0.0
    zone = m.group(3)
    offset = 0
    if zone != b"Z":
        digits = zone[1:].replace(b":", b"")
        offset = (int(digits[:2]) * 3600 + int(digits[2:]) * 60) * (1 if zone[:1] == b"+" else -1)
    return base + fraction - offset


TAI64N = StampFormat("tai64n", _TAI64N, False, _parse_tai64n, template=b"@" + b"x" * 24 + b" ")
TAI64NLOCAL = StampFormat("tai64nlocal", _TAI64NLOCAL, False, _parse_tai64nlocal,
                          template=b"dddd-dd-dd dd:dd:dd.ddddddddd ")
RFC3164 = StampFormat("syslog", _RFC3164, True, _parse_rfc3164)
RFC3339 = StampFormat("rfc3339", _RFC3339, True, _parse_rfc3339)
EXIM = StampFormat("exim", _EXIM, False, _parse_exim)
NONE = StampFormat("none", None, False, lambda _m, _r: None, template=b"")
FORMATS = (TAI64N, TAI64NLOCAL, EXIM, RFC3339, RFC3164)


def detect_format(buf: bytes, max_lines: int = 50) -> StampFormat:
    """The format most of the first complete lines of ``buf`` carry (none if unclear).

    Only each line's first bytes are looked at, so a megabyte-long first line costs
    nothing and does not hide the lines after it.
    """
    heads: list[bytes] = []
    start = 0
    while len(heads) < max_lines:
        end = buf.find(b"\n", start)
        if end < 0:
            break
        if end > start:
            heads.append(buf[start:min(end, start + 200)])
        start = end + 1
    if not heads:
        return NONE
    best, best_count = NONE, 0
    for fmt in FORMATS:
        assert fmt.prefix is not None
        count = sum(1 for head in heads if fmt.prefix.match(head))
        if count > best_count:
            best, best_count = fmt, count
    return best if best_count * 2 >= len(heads) else NONE


def detect_file_format(f: BinaryIO, max_lines: int = 50,
                       max_bytes: int = 64 << 20) -> StampFormat:
    """detect_format() of an open file's first lines, however long they are.

    Reading a fixed amount would find no complete line in a file whose first line is
    longer than that, and take the file for unstamped; so each line's head is kept and
    the rest of it skipped, up to ``max_bytes`` read in all.  Leaves ``f`` where it was.
    """
    start = f.tell()
    heads: list[bytes] = []
    read = 0
    while len(heads) < max_lines and read < max_bytes:
        head = f.readline(200)
        read += len(head)
        if not head:
            break
        complete = head.endswith(b"\n")
        while not complete and read < max_bytes:  # skip the rest of a long line
            rest = f.readline(1 << 20)
            if not rest:
                break
            read += len(rest)
            complete = rest.endswith(b"\n")
        if complete:
            heads.append(head.rstrip(b"\n") + b"\n")
    f.seek(start)
    return detect_format(b"".join(heads), max_lines)


def split_message(fmt: StampFormat, line: bytes) -> tuple[re.Match[bytes] | None, bytes]:
    """A line's stamp match (None if unstamped) and its message; the time is left to
    ``fmt.parse``, so that only lines that matter pay for it.

    Syslog: the message is ``TAG: text`` unless the text names its own program, after
    splogger's stamp if the text starts with one (qmail logging through splogger).  A line
    that lacks the file's stamp has no message: in a stamped log such a line was not
    written by the log's programs, so nothing in it is trusted.
    """
    if fmt.prefix is None:
        return None, line
    m = fmt.prefix.match(line)
    if m is None:
        return None, b""
    message = line[m.end():]
    if fmt.syslog and (splogger := _SPLOGGER.match(message)) is not None:
        message = message[splogger.end():]
    if fmt.syslog and not _OWN_PREFIX.match(message):
        tag = m.group(2) if fmt is RFC3164 else m.group(4)
        message = tag + b": " + message
    return m, message


def split_line(fmt: StampFormat, line: bytes, ref: float) -> tuple[float | None, bytes]:
    """A line's time and message (see split_message)."""
    m, message = split_message(fmt, line)
    return (fmt.parse(m, ref) if m is not None else None), message


def span_times(data: bytes | bytearray, start: int, stop: int, fmt: StampFormat,
          ref_time: float) -> tuple[float | None, float | None]:
    """The times of the first and the last of the lines ``data[start:stop]``; one
    stamp read when they are one line (as a daemon's read often is)."""
    first_end = data.find(b"\n", start, stop)
    first = split_line(fmt, bytes(data[start:first_end]), ref_time)[0]
    last_start = data.rfind(b"\n", start, stop - 1) + 1
    if last_start <= start:
        return first, first
    return first, split_line(fmt, bytes(data[last_start:stop - 1]), ref_time)[0]
