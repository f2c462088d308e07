"""The log generator must be trustworthy: benchmarks and tests take its truth as the answer.

So its truth is checked here against an independent count of the written file (plain
per-line parsing, no rblguard code), its stamps are decoded back to the intended times,
and its output must be byte-for-byte reproducible from the seed.
"""

from __future__ import annotations

import calendar
import ipaddress
import itertools
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import genlog

TAI64_UNIX_OFFSET = 4611686018427387914
N = 4000

_STAMP = {
    "tai64n": re.compile(r"@([0-9a-f]{16})([0-9a-f]{8}) "),
    "tai64nlocal": re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\.(\d{9}) "),
    "syslog": re.compile(r"([A-Z][a-z]{2} [ 1-3]\d \d\d:\d\d:\d\d) mx1 qmail-smtpd\[\d+\]: "),
    "rfc3339": re.compile(
        r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})\+00:00 mx1 qmail-smtpd\[\d+\]: "),
    "none": re.compile(r""),
}
_PROGRAMS = ("tcpserver: ", "rblsmtpd: ", "qmail-smtpd: ", "CHKUSER ", "simscan:[")
_ALLOWED = [ipaddress.ip_network(n) for n in (
    "198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


def _generate(tmp_path: Path, fmt: str, seed: int = 7, lines: int = N,
              share: float = 0.1) -> tuple[list[str], genlog.Truth]:
    path = tmp_path / f"{fmt}-{seed}.log"
    truth = genlog.write_log(path, fmt, seed, lines=lines, reject_share=share)
    return path.read_bytes().decode("ascii").split("\n"), truth


def _messages(lines: list[str], fmt: str) -> list[str]:
    assert lines[-1] == "", "the file must end with a newline"
    out = []
    for line in lines[:-1]:
        m = _STAMP[fmt].match(line)
        assert m is not None, f"bad {fmt} stamp: {line!r}"
        out.append(line[m.end():])
    return out


def _canonical(text: str) -> str:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


def _independent_count(messages: list[str]) -> dict[str, object]:
    """What the truth should say, counted with nothing but string tests."""
    codes: Counter[str] = Counter()
    addresses: set[str] = set()
    counts: Counter[str] = Counter()
    reject = re.compile(r"rblsmtpd: (\S+) pid \d+: (451|553) (.*)$")
    for message in messages:
        if message.startswith("tcpserver: pid "):
            counts["connections"] += 1
        if genlog.HOSTILE_TEXT in message and not message.startswith("rblsmtpd: "):
            counts["hostile"] += 1
        if not message.startswith("rblsmtpd: "):
            continue
        if message.endswith(": greetdelay: 15"):
            counts["greetdelay"] += 1
            continue
        m = reject.match(message)
        assert m is not None, message
        text = m.group(3)
        if text == "temporary RBL lookup error":
            counts["lookup_errors"] += 1
        elif text.startswith("Error:") or "/returnc/" in text:
            counts["dnsbl_errors"] += 1
        else:
            codes[m.group(2)] += 1
            addresses.add(_canonical(m.group(1)))
    return {"rejects": sum(codes.values()), "rejects_by_code": dict(codes),
            "reject_addresses": len(addresses), **counts}


def _times(lines: list[str], fmt: str) -> list[float]:
    """Each line's time as its stamp tells it (local time for the local formats)."""
    out = []
    for line in lines[:-1]:
        m = _STAMP[fmt].match(line)
        assert m is not None
        if fmt == "tai64n":
            out.append(int(m.group(1), 16) - TAI64_UNIX_OFFSET + int(m.group(2), 16) / 1e9)
        elif fmt == "tai64nlocal":
            local = time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")
            out.append(time.mktime(local) + int(m.group(2)) / 1e9)
        elif fmt == "rfc3339":
            utc = time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")
            out.append(calendar.timegm(utc) + int(m.group(2)) / 1e6)
    return out


@pytest.mark.parametrize("fmt", genlog.FORMATS)
def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, fmt: str) -> None:
    first, _ = _generate(tmp_path, fmt)
    again, _ = _generate(tmp_path, fmt)  # rewrites the same file: compared as read
    other, _ = _generate(tmp_path, fmt, seed=8)
    assert first == again
    assert first != other


@pytest.mark.parametrize("fmt", genlog.FORMATS)
def test_truth_equals_an_independent_count(tmp_path: Path, fmt: str) -> None:
    lines, truth = _generate(tmp_path, fmt, lines=20000)
    messages = _messages(lines, fmt)
    assert len(messages) == truth.lines == 20000
    assert sum(len(line) + 1 for line in lines[:-1]) == truth.bytes
    found = _independent_count(messages)
    for key, value in found.items():
        assert getattr(truth, key) == value, key
    # every kind the benchmarks rely on is present, or the comparison proves nothing
    assert truth.rejects_by_code["451"] and truth.rejects_by_code["553"]
    assert truth.lookup_errors and truth.dnsbl_errors and truth.greetdelay and truth.hostile
    assert all(message.startswith(_PROGRAMS) for message in messages)


def test_reject_share_is_about_what_was_asked(tmp_path: Path) -> None:
    for share in (0.1, 0.03):
        _, truth = _generate(tmp_path, "none", lines=30000, share=share)
        assert share * 0.85 < truth.rejects / truth.lines < share * 1.15


def test_reject_spellings_cover_ipv4_ipv6_and_mapped(tmp_path: Path) -> None:
    lines, _ = _generate(tmp_path, "none", lines=20000)
    spellings = [line.split()[1] for line in lines if line.startswith("rblsmtpd: ")]
    assert any(s.startswith("::ffff:198.") for s in spellings)
    assert any(s.startswith("2001:db8:") for s in spellings)
    assert any(s.startswith("198.1") for s in spellings)
    # spammers retry: the same address is rejected again and again
    assert Counter(spellings).most_common(1)[0][1] > 5


def test_only_documentation_addresses_appear(tmp_path: Path) -> None:
    lines, _ = _generate(tmp_path, "none", lines=20000)
    token = re.compile(r"(?:::ffff:)?\d+\.\d+\.\d+\.\d+|2001:db8:[0-9a-f:]*[0-9a-f]")
    # tcpserver's "ok" field ends in "::PORT", which is not part of the address
    ok_port = re.compile(r"^(tcpserver: ok .*)::\d+$")
    seen = {m for line in lines for m in token.findall(ok_port.sub(r"\1", line))}
    assert len(seen) > 100
    for text in seen:
        addr = ipaddress.ip_address(_canonical(text))
        assert any(addr in net for net in _ALLOWED), text


def test_tai64n_labels_decode_to_the_intended_times(tmp_path: Path) -> None:
    lines, truth = _generate(tmp_path, "tai64n")
    times = _times(lines, "tai64n")
    assert times[0] == pytest.approx(truth.first_time, abs=1e-6)
    assert times[-1] == pytest.approx(truth.last_time, abs=1e-6)
    assert genlog.START_TIME <= times[0] < genlog.START_TIME + 10
    assert all(a < b for a, b in itertools.pairwise(times)), "times must grow"
    # a plausible rate: a few connections a second, not all in one instant
    assert 1 < truth.connections / (times[-1] - times[0]) < 50


@pytest.mark.parametrize("fmt", ["tai64nlocal", "rfc3339"])
def test_other_stamps_tell_the_same_times(tmp_path: Path, fmt: str) -> None:
    reference = _times(_generate(tmp_path, "tai64n")[0], "tai64n")
    lines, _ = _generate(tmp_path, fmt)
    tolerance = 2e-6 if fmt == "rfc3339" else 1e-8
    assert _times(lines, fmt) == pytest.approx(reference, abs=tolerance)


def test_syslog_shape_and_same_messages(tmp_path: Path) -> None:
    plain, _ = _generate(tmp_path, "none")
    lines, _ = _generate(tmp_path, "syslog")
    assert lines[0].startswith("Jan 13 00:00:0")
    # the syslog line carries exactly the message multilog would, after the tag
    assert _messages(lines, "syslog") == plain[:-1]


def test_exact_line_count_even_mid_connection(tmp_path: Path) -> None:
    for lines in (1, 3, 7, 1001):
        text, truth = _generate(tmp_path, "none", lines=lines)
        assert len(text) - 1 == truth.lines == lines
        found = _independent_count(text[:-1])
        assert found["rejects"] == truth.rejects
        assert found.get("connections", 0) == truth.connections


def test_size_limit_writes_at_least_that_many_bytes(tmp_path: Path) -> None:
    path = tmp_path / "sized.log"
    truth = genlog.write_log(path, "tai64n", 3, size=300_000)
    assert truth.bytes == path.stat().st_size >= 300_000
    assert path.stat().st_size < 300_000 + 100_000  # small batches near the end


def test_multilog_directory_holds_the_same_log_rotated(tmp_path: Path) -> None:
    single = tmp_path / "single.log"
    genlog.write_log(single, "tai64n", 5, lines=N)
    directory = tmp_path / "main"
    truth = genlog.write_multilog(directory, "tai64n", 5, 20_000, lines=N)
    finished = sorted(p for p in directory.iterdir() if p.name != "current")
    assert len(finished) >= 5
    assert all(re.fullmatch(r"@[0-9a-f]{24}\.s", p.name) for p in finished)
    for p in finished:
        assert 20_000 <= p.stat().st_size < 20_000 + 400
        assert p.read_bytes().endswith(b"\n")
    joined = b"".join(p.read_bytes() for p in [*finished, directory / "current"])
    assert joined == single.read_bytes()
    assert truth.lines == N
    # each finished file is named no earlier than its own last line
    for p in finished:
        last = p.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        assert p.name[1:25] >= last[1:25].decode()


def test_cli_writes_log_and_truth(tmp_path: Path) -> None:
    out, truth_file = tmp_path / "cli.log", tmp_path / "truth.json"
    status = genlog.main(["--lines", "500", "--format", "syslog", "--seed", "9",
                          "--truth", str(truth_file), str(out)])
    assert status == 0
    truth = json.loads(truth_file.read_text())
    assert truth["lines"] == 500 == len(out.read_text().splitlines())
    assert truth["format"] == "syslog"
    with pytest.raises(SystemExit):
        genlog.main(["--lines", "5", "--format", "xml", str(out)])
