"""The compiled prefilter: the lines a rule may match, against a plain-Python reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rblguard.matching import prefilter
from rblguard.matching.rules import load_rules, shipped_rules_dir
from rblguard.matching.scanner import Scanner
from rblguard.sources.stamps import TAI64N
from tests.netns import IN_CI


@pytest.fixture(autouse=True)
def built() -> None:
    """Built by `pip install` and by the Debian package; CI must have it."""
    if not prefilter.available():
        if IN_CI:
            pytest.fail("rblguard.matching._prefilter is not built: run-tests.sh must "
                        "install a C compiler and Python's headers")
        pytest.skip("the compiled prefilter is not built here")


def reference(window: bytes, start: int, stop: int, width: int,
              literals: tuple[bytes, ...]) -> tuple[int, bytes, list[int]]:
    """What select() must give, line by line in Python: (lines, text, window starts)."""
    lines, text, origins, pos = 0, b"\n", [], start
    for line in window[start:stop].split(b"\n")[:-1]:
        if any(line[width:].startswith(lit) for lit in literals):
            text += line + b"\n"
            origins.append(pos)
        lines += 1
        pos += len(line) + 1
    return lines, text, origins


def test_picks_the_lines_whose_message_starts_with_a_fixed_text() -> None:
    window = (b"\n" b"@stamp rblsmtpd: 198.18.0.1 pid 1: 553\n"
              b"@stamp tcpserver: pid 1 from 198.18.0.1\n"
              b"@stamp x rblsmtpd: 203.0.113.9 pid 2: 553\n"  # not at the message start
              b"@st\n"  # shorter than the stamp
              b"@stamp rblsmtpd\n"  # the fixed text cut short by the line's end
              b"@stamp qmail-smtpd[9]: rbl: ip=198.18.0.2\n")
    got = prefilter.select(window, 1, len(window), 7, (b"rblsmtpd: ", b"qmail-smtpd["))
    assert got.lines == 6
    assert got.text == (b"\n@stamp rblsmtpd: 198.18.0.1 pid 1: 553\n"
                        b"@stamp qmail-smtpd[9]: rbl: ip=198.18.0.2\n")
    assert list(got.origins) == [1, window.index(b"@stamp qmail")]
    assert list(got.starts) == [1, got.text.index(b"@stamp qmail")]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from([b"", b"ab", b"abc", b"xab", b"abcd", b"zzab",
                                       b"ab\xff\x00", b"a" * 300]), max_size=30),
       width=st.integers(0, 3), start_line=st.integers(0, 3))
def test_agrees_with_the_reference(lines: list[bytes], width: int, start_line: int) -> None:
    window = b"\n" + b"".join(line + b"\n" for line in lines)
    start = 1 + sum(len(line) + 1 for line in lines[:start_line])
    start = min(start, len(window))
    literals = (b"ab", b"zz")
    got = prefilter.select(bytearray(window), start, len(window), width, literals)
    lines_count, text, origins = reference(window, start, len(window), width, literals)
    assert (got.lines, got.text, list(got.origins)) == (lines_count, text, origins)
    for k, origin in enumerate(origins):  # every byte of a chosen line, and its newline
        length = window.index(b"\n", origin) - origin + 1
        for i in range(length):
            assert got.origin(got.starts[k] + i) == origin + i
            assert window[origin + i] == got.text[got.starts[k] + i]


def test_nothing_past_stop_is_read() -> None:
    window = b"\nab 1\nab 2\nab 3"  # stop before the partial last line
    got = prefilter.select(window, 1, window.index(b"ab 3"), 0, (b"ab",))
    assert (got.lines, got.text) == (2, b"\nab 1\nab 2\n")
    partial = prefilter.select(window, 1, len(window), 0, (b"ab",))
    assert (partial.lines, partial.text) == (2, b"\nab 1\nab 2\n"), "no line without its newline"
    empty = prefilter.select(window, 1, 1, 0, (b"ab",))
    assert (empty.lines, empty.text, list(empty.origins)) == (0, b"\n", [])


@pytest.mark.parametrize(("args", "error", "text"), [
    ((b"\nx\n", 1, 9, 0, (b"x",)), ValueError, "out of range"),
    ((b"\nx\n", 2, 1, 0, (b"x",)), ValueError, "out of range"),
    ((b"\nx\n", 1, 3, -1, (b"x",)), ValueError, "out of range"),
    ((b"\nx\n", 1, 3, 0, (b"",)), TypeError, "non-empty bytes"),
    ((b"\nx\n", 1, 3, 0, ("x",)), TypeError, "non-empty bytes"),
    ((b"\nx\n", 1, 3, 0, tuple(b"%d" % i for i in range(65))), ValueError, "too many"),
])
def test_bad_arguments_are_refused(args: tuple, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        prefilter.select(*args)


def test_a_picked_line_must_still_carry_a_real_stamp() -> None:
    """The prefilter looks only at where the message starts; the stamp itself is the
    rule's pattern's to check, as when it searches whole windows."""
    good = b"@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.1 pid 1: 553 listed\n"
    forged = b"@zzzzzzzzzzzzzzzzzzzzzzzz rblsmtpd: 203.0.113.9 pid 1: 553 listed\n"
    rules = load_rules([shipped_rules_dir()])
    for use_prefilter in (True, False):
        counted = Scanner(rules, use_prefilter=use_prefilter).tally(forged + good, 0, TAI64N, 0)
        assert counted.match_counts == {("rblsmtpd", "198.18.0.1"): 1}
        assert counted.lines == 2
