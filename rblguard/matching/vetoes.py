"""Finding the hits an ignore vetoes, for Scanner.tally(), without a regex pass per line.

``tally`` counts a rule's hits with one findall over a whole buffer.  Its ignores (a DNS
failure, a DNSBL error reply) veto only a few of those hits; these helpers find which,
mostly with bytes.find over the hits' tails, several times cheaper than matching every
line again.  They also hold the bounds on matching time that the scanner uses, and
name the DNSBL an error reply comes from (dnsbl_zone).
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterator

import regex

from rblguard.matching.prefix import split_literal

# Bounds on matching time (docs/rules.md): a rule that backtracks catastrophically on a
# hostile line must not stall the daemon.  A buffer's search that takes longer than
# BUFFER_TIMEOUT is done again line by line, and a line on which one rule takes longer
# than LINE_TIMEOUT is skipped for that rule (a ParseError with reason "timeout").
# An ordinary rule needs microseconds per line; both bounds are far above that.
BUFFER_TIMEOUT = 0.3
LINE_TIMEOUT = 0.2
# Where an error reply names its DNSBL: the URL of its TXT, else the zone a line names
# (postscreen's dnsblog: "listed by domain zen.spamhaus.org as 127.255.255.254").
_URL_HOST = re.compile(rb"https?://([A-Za-z0-9.-]+)|listed by domain ([A-Za-z0-9.-]+) as ")


def literal_alternatives(pattern: bytes) -> list[bytes] | None:
    """``Error:|/returnc/`` -> [b"Error:", b"/returnc/"]; None if it is more than texts.
    Each alternative is read as a rule's own fixed text is (rules.split_literal)."""
    texts = []
    for part in pattern.decode().split("|"):
        text, rest = split_literal(part)
        if rest or not text:
            return None
        texts.append(text.encode())
    return texts


def vetoed_tails(tails: list[bytes], veto: regex.Pattern,
                  literals: list[bytes] | None) -> set[bytes]:
    """The whole tails (rest of line after a hit) in which ``veto`` matches.

    Found in the tails joined into one short buffer, each position mapped back to its
    tail.  Plain texts are found with bytes.find in the tails joined as they are: one
    that spans two tails only names a tail that vetoed_hits then finds no veto in, and
    find looks at every position, so none is hidden.  A regex gets a newline between
    tails, which no rule pattern can match, so a match never runs from one into the next.
    """
    sep = b"" if literals is not None else b"\n"
    joined = sep.join(tails)
    positions: list[int] = []
    if literals is None:
        positions = [m.start() for m in veto.finditer(joined, timeout=BUFFER_TIMEOUT)]
    else:
        for text in literals:
            at = joined.find(text)
            while at >= 0:
                positions.append(at)
                at = joined.find(text, at + 1)
    if not positions or not tails:
        return set()
    starts = list(itertools.accumulate(map(len, tails), initial=0))
    if sep:
        starts = [start + i for i, start in enumerate(starts)]
    # A match at the very end (an empty pattern, as an error: rule's) names the last
    # tail; naming one too many is harmless, as vetoed_hits checks each line again.
    last = len(tails) - 1
    return {tails[min(bisect.bisect_right(starts, at) - 1, last)] for at in positions}


def vetoed_hits(veto: regex.Pattern, full: regex.Pattern,
                veto_pattern: regex.Pattern, data: bytes | bytearray, stop: int,
                texts: dict[bytes, int] | None) -> Iterator[tuple[regex.Match, int]]:
    """The hits of ``full`` in ``data[:stop]`` whose rest of line ``veto`` matches, with
    the index of their line's end: what ``veto_pattern.finditer`` finds, in line order.

    ``texts`` are the whole tails in which the veto matched, each with the number of
    hits that end in it.  Vetoed lines are rare (a lookup error, an error reply) and
    their tails long and few, so finding them with bytes.find and checking only their
    lines is several times cheaper than another regex pass over the whole buffer, and
    the search for a tail stops once all of its hits are found; with many different
    texts, or None (not known), that pass it is.
    """
    if texts is not None and not texts:
        return
    if texts is None or len(texts) > 8 or b"" in texts:
        for m in veto_pattern.finditer(data, 0, stop, timeout=BUFFER_TIMEOUT):
            le = data.find(b"\n", m.start())
            if le >= m.end():
                yield m, le
        return
    hits: dict[int, tuple[regex.Match, int]] = {}  # by the newline before the line
    for text, expected in texts.items():
        at, seen = data.find(text, 0, stop), 0
        while at >= 0 and seen < expected:
            ls, le = data.rfind(b"\n", 0, at), data.find(b"\n", at)
            m = full.search(data, ls, le, timeout=LINE_TIMEOUT)  # the line's own hit
            if m is not None and data[m.end():le] == text:
                seen += 1
                if veto.search(data, m.end(), le, timeout=LINE_TIMEOUT):
                    hits[ls] = (m, le)
            at = data.find(text, le, stop)
    for ls in sorted(hits):
        yield hits[ls]


def vetoed_lines(veto: regex.Pattern, full: regex.Pattern, data: bytes | bytearray,
                 stop: int, texts: list[bytes]) -> Iterator[tuple[regex.Match, int]]:
    """The hits of ``full`` in ``data[:stop]`` whose rest of line ``veto`` matches, with
    the index of their line's end, in line order, when ``texts`` are the veto's plain
    texts: only a line that holds one can be vetoed, so only those lines are checked.

    For the few lines the prefilter picked (rblguard.matching.prefilter), where a pass
    of bytes.find per text is cheap and findall need not hand back every hit's tail.
    """
    lines: dict[int, int] = {}  # the newline before each line that holds a text: its end
    for text in texts:
        at = data.find(text, 0, stop)
        while at >= 0:
            ls, le = data.rfind(b"\n", 0, at), data.find(b"\n", at, stop)
            le = stop if le < 0 else le
            lines[ls] = le
            at = data.find(text, le, stop)
    for ls in sorted(lines):
        le = lines[ls]
        m = full.search(data, ls, le, timeout=LINE_TIMEOUT)  # the line's own hit
        if m is not None and veto.search(data, m.end(), le, timeout=LINE_TIMEOUT):
            yield m, le


def dnsbl_zone(text: bytes) -> str | None:
    """The DNSBL operator named by an error reply's URL (``spamhaus.org``), if any."""
    m = _URL_HOST.search(text)
    if m is None:
        return None
    host = m.group(1) or m.group(2)
    return ".".join(host.decode("ascii", "replace").lower().split(".")[-2:])
