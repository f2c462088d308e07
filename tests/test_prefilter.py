"""The compiled prefilter: the lines a rule may match, against a plain-Python reference."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rblguard.matching import prefilter
from rblguard.matching.rules import load_rules, shipped_rules_dir
from rblguard.matching.scanner import Scanner
from rblguard.sources.stamps import FORMATS, TAI64N
from tests.netns import IN_CI


@pytest.fixture(autouse=True)
def built() -> None:
    """Built by `pip install` and by the Debian package; CI must have it."""
    if not prefilter.available():
        if IN_CI:
            pytest.fail("rblguard.matching._prefilter is not built: run-tests.sh must "
                        "install a C compiler and Python's headers")
        pytest.skip("the compiled prefilter is not built here")


def stamped(line: bytes, template: bytes) -> bool:
    """What the template says of a line's start: "x" a lower-case hex digit, "d" a
    decimal digit, any other byte itself."""
    if len(line) < len(template):
        return False
    classes = {ord("x"): b"0123456789abcdef", ord("d"): b"0123456789"}
    return all(c in classes[t] if t in classes else c == t
               for c, t in zip(line, template, strict=False))


def reference(window: bytes, start: int, stop: int, template: bytes,
              literals: tuple[bytes, ...]) -> tuple[int, bytes, list[int], list[int]]:
    """What select() must give, line by line in Python: (lines, text, window positions
    of the chosen messages, how many of them start with each literal)."""
    width = len(template)
    lines, text, origins, pos = 0, b"\n", [], start
    found = [0] * len(literals)
    for line in window[start:stop].split(b"\n")[:-1]:
        starts = [line[width:].startswith(lit) for lit in literals]
        if stamped(line, template) and any(starts):
            text += line[width:] + b"\n"
            origins.append(pos + width)
            found = [n + s for n, s in zip(found, starts, strict=True)]
        lines += 1
        pos += len(line) + 1
    return lines, text, origins, found


def test_picks_the_messages_of_stamped_lines_that_start_with_a_fixed_text() -> None:
    window = (b"\n" b"@0a rblsmtpd: 198.18.0.1 pid 1: 553\n"
              b"@0a tcpserver: pid 1 from 198.18.0.1\n"
              b"@0a x rblsmtpd: 203.0.113.9 pid 2: 553\n"  # not at the message start
              b"@0A rblsmtpd: 203.0.113.9 pid 3: 553\n"  # not a stamp: upper case
              b"@0\n"  # shorter than the stamp
              b"@0a rblsmtpd\n"  # the fixed text cut short by the line's end
              b"@9f qmail-smtpd[9]: rbl: ip=198.18.0.2\n")
    got = prefilter.select(window, 1, len(window), b"@xx ", (b"rblsmtpd: ", b"qmail-smtpd["))
    assert got.lines == 7
    assert got.text == b"\nrblsmtpd: 198.18.0.1 pid 1: 553\nqmail-smtpd[9]: rbl: ip=198.18.0.2\n"
    assert list(got.origins) == [5, window.index(b"qmail")]
    assert list(got.starts) == [1, got.text.index(b"qmail")]
    assert list(got.found) == [1, 1]


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.sampled_from([b"", b"ab", b"5ab", b"5abc", b"xab", b"Fab", b"fzz",
                                       b"5ab\xff\x00", b"-ab", b"5" + b"a" * 300]),
                      max_size=30),
       template=st.sampled_from([b"", b"x", b"d", b"-"]), start_line=st.integers(0, 3))
def test_agrees_with_the_reference(lines: list[bytes], template: bytes, start_line: int) -> None:
    window = b"\n" + b"".join(line + b"\n" for line in lines)
    start = min(1 + sum(len(line) + 1 for line in lines[:start_line]), len(window))
    literals = (b"ab", b"zz", b"a")  # "a" starts every line "ab" starts: both count it
    got = prefilter.select(bytearray(window), start, len(window), template, literals)
    lines_count, text, origins, found = reference(window, start, len(window), template,
                                                  literals)
    assert (got.lines, got.text, list(got.origins)) == (lines_count, text, origins)
    assert list(got.found) == found
    for k, origin in enumerate(origins):  # every byte of a chosen message, and its newline
        length = window.index(b"\n", origin) - origin + 1
        for i in range(length):
            assert got.origin(got.starts[k] + i) == origin + i
            assert window[origin + i] == got.text[got.starts[k] + i]


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.template is not None],
                         ids=lambda f: f.name)
@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_a_template_says_what_its_stamp_pattern_says(fmt, data) -> None:
    """The prefilter checks stamps by the template, the whole-window search by the
    format's pattern: they must agree on every line start, or the two would differ."""
    assert fmt.template is not None and fmt.prefix is not None
    alphabet = st.sampled_from(b"0123456789abcdefABCDEFxz@ -:.T\n")
    chars = data.draw(st.lists(st.one_of(alphabet, st.sampled_from(
        [t for t in fmt.template if t not in b"xd"])), min_size=len(fmt.template),
        max_size=len(fmt.template)))
    if data.draw(st.booleans()):  # a real stamp, with one byte perhaps replaced
        real = bytearray(_real_stamp(fmt))
        at = data.draw(st.integers(0, len(real)))
        if at < len(real):
            real[at] = chars[at]
        chars = list(real)
    line = bytes(chars) + b"rest"
    m = fmt.prefix.match(line)
    assert stamped(line, fmt.template) == (m is not None and m.end() == len(fmt.template))


def _real_stamp(fmt) -> bytes:
    return {"tai64n": b"@4000000065a1d28a302953e2 ",
            "tai64nlocal": b"2024-01-13 00:00:00.123456789 "}[fmt.name]


def test_nothing_past_stop_is_read() -> None:
    window = b"\nab 1\nab 2\nab 3"  # stop before the partial last line
    got = prefilter.select(window, 1, window.index(b"ab 3"), b"", (b"ab",))
    assert (got.lines, got.text) == (2, b"\nab 1\nab 2\n")
    partial = prefilter.select(window, 1, len(window), b"", (b"ab",))
    assert (partial.lines, partial.text) == (2, b"\nab 1\nab 2\n"), "no line without its newline"
    empty = prefilter.select(window, 1, 1, b"", (b"ab",))
    assert (empty.lines, empty.text, list(empty.origins)) == (0, b"\n", [])


@pytest.mark.parametrize(("args", "error", "text"), [
    ((b"\nx\n", 1, 9, b"", (b"x",)), ValueError, "out of range"),
    ((b"\nx\n", 2, 1, b"", (b"x",)), ValueError, "out of range"),
    ((b"\nx\n", 1, 3, b"", (b"",)), TypeError, "non-empty bytes"),
    ((b"\nx\n", 1, 3, b"", ("x",)), TypeError, "non-empty bytes"),
    ((b"\nx\n", 1, 3, b"", tuple(b"%d" % i for i in range(65))), ValueError, "too many"),
])
def test_bad_arguments_are_refused(args: tuple, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        prefilter.select(*args)


def test_a_picked_line_must_still_carry_a_real_stamp() -> None:
    """A line whose stamp is not one is no reject, whether the prefilter picks the lines
    or the rule's pattern searches the whole window."""
    good = b"@4000000065a1d28a302953e2 rblsmtpd: 198.18.0.1 pid 1: 553 listed\n"
    forged = [b"@zzzzzzzzzzzzzzzzzzzzzzzz rblsmtpd: 203.0.113.9 pid 1: 553 listed\n",
              b"@4000000065A1D28A302953E2 rblsmtpd: 203.0.113.9 pid 1: 553 listed\n"]
    rules = load_rules([shipped_rules_dir()])
    for use_prefilter in (True, False):
        counted = Scanner(rules, use_prefilter=use_prefilter).tally(
            b"".join(forged) + good, 0, TAI64N, 0)
        assert counted.match_counts == {("rblsmtpd", "198.18.0.1"): 1}
        assert counted.lines == 3
