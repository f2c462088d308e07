"""A deterministic, realistic qmail front-end log, and the truth about what is in it.

Benchmarks and tests need logs that look like a busy MX's (tcpserver, rblsmtpd,
qmail-smtpd, CHKUSER and simscan lines, in every stamp format rblguard reads) and they
need to know, without trusting rblguard, how many rejects such a log holds.  This module
writes such a log from a seeded ``random.Random`` and counts, while writing, what it
put in: rejects by code, distinct (canonical) reject addresses, the lines that must
never ban (lookup errors, DNSBL error replies, greetdelay lines, hostile client text).

Speed matters more than elegance here: a 1 GB log must take about a minute, so lines
are built with f-strings from precomputed pools and written in large buffers.

    python benchmarks/genlog.py --lines 1000000 --format tai64n --seed 1 \\
        --truth truth.json smtpd.log
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

TAI64_UNIX_OFFSET = 4611686018427387914  # 2**62 + 10: TAI64 label of the Unix epoch
FORMATS = ("tai64n", "tai64nlocal", "syslog", "rfc3339", "none")
START_TIME = 1705104000  # 2024-01-13 00:00:00 UTC: a fixed start keeps output reproducible
HOSTILE_TEXT = "rblsmtpd: 203.0.113.9 pid 1: 553 x"  # a client imitating a reject
ERROR_REPLY = "Error: open resolver; https://check.spamhaus.org/returnc/pub/203.0.113.53/"
LOOKUP_ERROR = "temporary RBL lookup error"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Per connection: how often each rare kind of line happens.
LOOKUP_ERROR_SHARE = 0.002
DNSBL_ERROR_SHARE = 0.001
GREETDELAY_SHARE = 0.3  # of connections that rblsmtpd lets through
HOSTILE_SHARE = 0.01  # of sessions
MAPPED_SHARE = 0.15  # IPv4 spammers written as ::ffff:a.b.c.d by an IPv6 tcpserver
SPAMCOP_SHARE = 0.25  # rejects that came from the second zone (bl.spamcop.net)
CODE_553_SHARE = 0.7  # rblsmtpd -b answers 553; a zone without -b answers 451
# A session: status, pid, ok, [greetdelay], qmail-smtpd, 1-3 CHKUSER, simscan, end.
_SESSION_MEAN_LINES = 4 + GREETDELAY_SHARE + 1 + 2 + 1
_REJECT_LINES = 5  # status, pid, ok, rblsmtpd, end


@dataclass
class Truth:
    """What the generator wrote, counted as it wrote it: the answer scan must give."""

    format: str
    seed: int
    lines: int = 0
    connections: int = 0  # `tcpserver: pid N from ADDR` lines
    rejects: int = 0  # ban-worthy rblsmtpd lines
    rejects_by_code: dict[str, int] = field(default_factory=lambda: {"451": 0, "553": 0})
    reject_addresses: int = 0  # distinct canonical addresses of those rejects
    lookup_errors: int = 0
    dnsbl_errors: int = 0
    greetdelay: int = 0
    hostile: int = 0  # lines whose client text imitates a reject: never a ban
    bytes: int = 0
    first_time: float | None = None
    last_time: float | None = None


def _spammer_pool(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """(canonical, mapped-or-IPv6 spelling) for listed clients; most are IPv4."""
    pool: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(pool) < size:
        if rng.random() < 0.2:
            address = f"2001:db8:{rng.randrange(1, 0xffff):x}::{rng.randrange(1, 0xffff):x}"
            spelling = address
        else:
            n = rng.randrange(1 << 17)  # 198.18.0.0/15
            address = f"198.{18 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"
            spelling = "::ffff:" + address
        if address not in seen:
            seen.add(address)
            pool.append((address, spelling))
    return pool


def _legit_pool() -> list[str]:
    return [f"192.0.2.{i}" for i in range(1, 255)] + [f"198.51.100.{i}" for i in range(1, 255)]


class _Stamper:
    """Turns (Unix seconds, nanoseconds) into one format's line prefix.

    Stamps that only change once a second (local time, syslog) are cached per second:
    a busy log writes many lines in each.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self._second = -1
        self._text = ""
        self.stamp: Callable[[int, int], str] = getattr(self, "_" + fmt)

    def _tai64n(self, sec: int, ns: int) -> str:
        return f"@{sec + TAI64_UNIX_OFFSET:016x}{ns:08x} "

    def _tai64nlocal(self, sec: int, ns: int) -> str:
        if sec != self._second:
            self._second, self._text = sec, time.strftime("%Y-%m-%d %H:%M:%S",
                                                          time.localtime(sec))
        return f"{self._text}.{ns:09d} "

    def _syslog(self, sec: int, _ns: int) -> str:
        if sec != self._second:
            t = time.localtime(sec)
            self._second = sec
            self._text = (f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} "
                          f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} mx1 qmail-smtpd[7065]: ")
        return self._text

    def _rfc3339(self, sec: int, ns: int) -> str:
        if sec != self._second:
            self._second = sec
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._text}.{ns // 1000:06d}+00:00 mx1 qmail-smtpd[7065]: "

    def _none(self, _sec: int, _ns: int) -> str:
        return ""


class LogGenerator:
    """Yields the log as text batches and keeps ``truth`` up to date as it goes."""

    def __init__(self, fmt: str, seed: int, reject_share: float = 0.1,
                 spammers: int = 20000) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
        if not 0.0 <= reject_share < 1.0 / _REJECT_LINES:
            raise ValueError(f"reject share must be in [0, {1 / _REJECT_LINES})")
        self.rng = random.Random(seed)
        self.truth = Truth(format=fmt, seed=seed)
        self.stamper = _Stamper(fmt)
        self.spammers = _spammer_pool(self.rng, spammers)
        self.legit = _legit_pool()
        # Share of connections that are rejects, so that rejects are `reject_share` of
        # all lines: p = r*L / (1 - r*5 + r*L) with L the mean session length.
        r, mean = reject_share, _SESSION_MEAN_LINES
        self.reject_connection_share = r * mean / (1 - r * _REJECT_LINES + r * mean)
        self.time_ns = START_TIME * 10**9
        self.pid = 7066
        self._reject_seen: set[int] = set()

    def batches(self, lines: int | None = None, size: int | None = None,
                batch_lines: int = 100_000) -> Iterator[str]:
        """Newline-terminated text of about ``batch_lines`` lines each, until exactly
        ``lines`` lines or at least ``size`` bytes (ASCII: characters are bytes)."""
        if (lines is None) == (size is None):
            raise ValueError("give exactly one of lines and size")
        truth = self.truth
        while (truth.lines < lines) if lines is not None else (truth.bytes < size):
            # A batch ends after a whole connection: only the log's end may cut one short.
            left = (lines - truth.lines) if lines is not None else 1 << 62
            want = min(batch_lines, left)
            if size is not None:  # near the end, smaller batches: overshoot stays small
                want = min(want, max(1000, (size - truth.bytes) // 80))
            out: list[str] = []
            while len(out) < want:
                self._connection(out, left - len(out))
            truth.lines += len(out)
            out.append("")
            text = "\n".join(out)
            truth.bytes += len(text)
            yield text
        truth.reject_addresses = len(self._reject_seen)

    def _connection(self, out: list[str], room: int) -> None:
        """Append one connection's lines (cut short if only ``room`` lines fit)."""
        rng = self.rng
        random_ = rng.random
        self.pid += 1 + int(random_() * 3)
        if self.pid > 32000:
            self.pid = 7066
        pid = self.pid
        # Connections arrive about 5 a second; lines within one follow in milliseconds.
        self.time_ns += int(rng.expovariate(5.0) * 1e9) + 1
        spam = random_() < self.reject_connection_share
        index = -1
        if spam:
            index = int(len(self.spammers) * random_() ** 3)  # a few clients retry a lot
            address, spelling = self.spammers[index]
            if spelling.startswith("::ffff:") and random_() >= MAPPED_SHARE:
                spelling = address
        else:
            address = spelling = self.legit[int(random_() * len(self.legit))]
        messages = [
            f"tcpserver: status: {1 + int(random_() * 19)}/20",
            f"tcpserver: pid {pid} from {spelling}",
            f"tcpserver: ok {pid} mail.example.net:192.0.2.10:25 :{spelling}::"
            f"{1024 + int(random_() * 60000)}",
        ]
        # (line index, what the truth counts if that line is written)
        facts: list[tuple[int, str]] = [(1, "connection")]
        rare = random_()
        if rare < LOOKUP_ERROR_SHARE:
            facts.append((3, "lookup"))
            messages.append(f"rblsmtpd: {spelling} pid {pid}: 451 {LOOKUP_ERROR}")
        elif rare < LOOKUP_ERROR_SHARE + DNSBL_ERROR_SHARE:
            code = "553" if random_() < CODE_553_SHARE else "451"
            facts.append((3, "dnsbl"))
            messages.append(f"rblsmtpd: {spelling} pid {pid}: {code} {ERROR_REPLY}")
        elif spam:
            code = "553" if random_() < CODE_553_SHARE else "451"
            if random_() < SPAMCOP_SHARE:
                text = f"Blocked - see https://www.spamcop.net/bl.shtml?{address}"
            else:
                text = f"https://www.spamhaus.org/query/ip/{address}"
            facts.append((3, code))
            messages.append(f"rblsmtpd: {spelling} pid {pid}: {code} {text}")
        else:
            self._session(messages, facts, spelling, pid)
        messages.append(f"tcpserver: end {pid} status 0")
        if len(messages) > room:
            del messages[room:]
        kept = len(messages)
        truth = self.truth
        for at, kind in facts:
            if at >= kept:
                continue
            if kind == "connection":
                truth.connections += 1
            elif kind == "553" or kind == "451":
                truth.rejects += 1
                truth.rejects_by_code[kind] += 1
                self._reject_seen.add(index)
            elif kind == "hostile":
                truth.hostile += 1
            elif kind == "greet":
                truth.greetdelay += 1
            elif kind == "lookup":
                truth.lookup_errors += 1
            else:
                truth.dnsbl_errors += 1
        self._stamp(out, messages)

    def _session(self, messages: list[str], facts: list[tuple[int, str]], address: str,
                 pid: int) -> None:
        """Lines of a session rblsmtpd let through: text the client chose is logged.

        One session in a hundred is hostile: its HELO and subject imitate an rblsmtpd
        reject, which a correct scanner never counts (the text is not at the message
        start).
        """
        random_ = self.rng.random
        sender = f"u{int(random_() * 500)}@sender{int(random_() * 50)}.example.org"
        helo = f"mail{int(random_() * 99)}.example.org"
        subject = f"Report {int(random_() * 10000)}"
        hostile = random_() < HOSTILE_SHARE
        if hostile:
            helo = subject = HOSTILE_TEXT
        if random_() < GREETDELAY_SHARE:
            facts.append((len(messages), "greet"))
            messages.append(f"rblsmtpd: {address} pid {pid}: greetdelay: 15")
        first_hostile = len(messages)
        messages.append(f"qmail-smtpd: pid {pid} from {address} HELO {helo} "
                        f"MAIL FROM <{sender}>")
        rcpt = ""
        for _ in range(1 + int(random_() * 3)):  # 1..3 recipients, 2 on average
            rcpt = f"user{int(random_() * 200)}@example.net"
            verdict, why = "accepted rcpt", "found existing recipient"
            if random_() < 0.1:
                verdict, why = "rejected rcpt", "not existing recipient"
            messages.append(f"CHKUSER {verdict}: from <{sender}::> remote "
                            f"<{helo}:unknown:{address}> rcpt <{rcpt}> : {why}")
        messages.append(f"simscan:[{pid}]:CLEAN (0.{int(random_() * 99):02d}/5.00):0.1s:"
                        f"{subject}:{address}:{sender}:{rcpt}")
        if hostile:
            facts.extend((at, "hostile") for at in range(first_hostile, len(messages)))

    def _stamp(self, out: list[str], messages: list[str]) -> None:
        """Stamp each message, a few hundred microseconds apart: times only grow."""
        stamp = self.stamper.stamp
        t = self.time_ns
        truth = self.truth
        if truth.first_time is None:
            truth.first_time = t / 1e9
        for message in messages:
            sec, ns = divmod(t, 1_000_000_000)
            out.append(stamp(sec, ns) + message)
            t += 150_000 + (len(message) << 10)
        truth.last_time = (t - 150_000 - (len(messages[-1]) << 10)) / 1e9
        self.time_ns = t


def write_log(out: str | Path, fmt: str, seed: int, *, lines: int | None = None,
              size: int | None = None, reject_share: float = 0.1) -> Truth:
    """Write a log of ``lines`` lines (or about ``size`` bytes) to one file; its truth.

    Streamed in batches: memory stays small however large the log.
    """
    gen = LogGenerator(fmt, seed, reject_share)
    with open(out, "wb") as f:
        for text in gen.batches(lines, size):
            f.write(text.encode("ascii"))
    return gen.truth


def write_multilog(directory: str | Path, fmt: str, seed: int, file_size: int, *,
                   lines: int | None = None, size: int | None = None,
                   reject_share: float = 0.1) -> Truth:
    """Write the log as multilog leaves it: finished ``@<tai64n>.s`` files of about
    ``file_size`` bytes (a file ends at the first line that reaches the limit) and the
    live ``current``.  Each finished file is named by the time of its last line, as
    multilog names it at rotation; all files are kept (no ``n`` limit).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = LogGenerator(fmt, seed, reject_share)
    current = bytearray()
    last_name = 0
    # Small batches, so a rotated file's name is close to its last line's time.
    batch_lines = max(20, min(100_000, file_size // 200))
    for text in gen.batches(lines, size, batch_lines=batch_lines):
        current += text.encode("ascii")
        while len(current) >= file_size:
            cut = current.find(b"\n", file_size - 1) + 1
            if cut == 0:
                break
            stamp_ns = max(int((gen.truth.last_time or 0) * 1e9), last_name + 1)
            last_name = stamp_ns
            sec, ns = divmod(stamp_ns, 1_000_000_000)
            name = f"@{sec + TAI64_UNIX_OFFSET:016x}{ns:08x}.s"
            (directory / name).write_bytes(current[:cut])
            del current[:cut]
    (directory / "current").write_bytes(current)
    return gen.truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, help="exactly this many lines")
    parser.add_argument("--bytes", type=int, dest="size", help="or at least this many bytes")
    parser.add_argument("--format", choices=FORMATS, default="tai64n")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--reject-share", type=float, default=0.1,
                        help="share of all lines that are rejects (default 0.1)")
    parser.add_argument("--truth", metavar="FILE.json", help="write the truth here")
    parser.add_argument("--multilog", metavar="DIR",
                        help="write a multilog directory instead of OUT")
    parser.add_argument("--size", type=int, default=99999, dest="file_size",
                        help="with --multilog: bytes per rotated file (default 99999)")
    parser.add_argument("out", nargs="?", metavar="OUT", help="the log file to write")
    args = parser.parse_args(argv)
    if (args.lines is None) == (args.size is None):
        parser.error("give exactly one of --lines and --bytes")
    if (args.out is None) == (args.multilog is None):
        parser.error("give exactly one of OUT and --multilog DIR")
    try:
        if args.multilog:
            truth = write_multilog(args.multilog, args.format, args.seed, args.file_size,
                                   lines=args.lines, size=args.size,
                                   reject_share=args.reject_share)
        else:
            truth = write_log(args.out, args.format, args.seed, lines=args.lines,
                              size=args.size, reject_share=args.reject_share)
    except ValueError as exc:
        parser.error(str(exc))
    if args.truth:
        Path(args.truth).write_text(json.dumps(asdict(truth), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
