"""The scanner's prefilter: the lines a rule may match, picked out in one pass in C.

A rule's anchored pattern (rblguard.matching.scanner) only matches a line whose message,
right after a valid stamp, begins with the rule's fixed text.  When the stamp has a
fixed width, such lines can be told from all others byte by byte: the stamp against
its format's template (StampFormat.template), then the fixed text right after it.
``select`` does that, and counts the lines, in one pass of compiled code
(``_prefilter.c``): about 14 ms for a 95 MB log, where counting the newlines alone
takes Python 40 ms and each rule's search over the whole text 30-90 ms.  It copies out
the messages of the lines it picks, about a tenth of a front end's log, and the rules'
searches then run over them as over a log without stamps, with no look-behind at the
stamp left to check for each hit.  It is an exact filter, not a heuristic: a line it
leaves out cannot match, because the pattern requires a valid stamp and the fixed
text at exactly that place; the template is checked against the stamp's own pattern
in the tests.

The module is compiled when the package is built (setup.py; the Debian package is
built with it).  Where it is not there, ``available()`` is False and the scanner
searches whole windows, as before: the same results, slower.
"""

from __future__ import annotations

import bisect
from array import array
from typing import NamedTuple

try:
    from rblguard.matching._prefilter import select as _select
except ImportError:  # built without a compiler: the scanner searches whole windows
    _select = None


class Selection(NamedTuple):
    """The messages of the lines of a window a rule may match, copied out.

    ``text`` is a newline followed by each chosen line's message (the line without its
    stamp, which select() has checked) with its newline, so a pattern anchored after a
    newline finds each as it would a line without a stamp.  ``lines`` counts every
    line of the window, chosen or not.
    """

    lines: int
    text: bytes
    starts: array  # where each chosen message starts in text
    origins: array  # where it starts in the window
    # per fixed text, in the order select() was given them: the chosen messages that
    # start with it (a rule with none has no hit here, and needs no search)
    found: array

    def origin(self, pos: int) -> int:
        """The window's position of ``text[pos]`` (a byte of a chosen message or its
        newline)."""
        k = bisect.bisect_right(self.starts, pos) - 1
        return self.origins[k] + pos - self.starts[k]


def available() -> bool:
    """Whether the compiled prefilter is there."""
    return _select is not None


def select(window: bytes | bytearray, start: int, stop: int, template: bytes,
           literals: tuple[bytes, ...]) -> Selection:
    """The messages of the lines of ``window[start:stop]`` (whole lines) that start with
    a stamp ``template`` describes (StampFormat.template) followed by one of
    ``literals``; RuntimeError if not available()."""
    if _select is None:
        raise RuntimeError("rblguard's compiled prefilter is not built")
    lines, text, pairs, counts = _select(window, start, stop, template, literals)
    both, found = array("q"), array("q")
    both.frombytes(pairs)
    found.frombytes(counts)
    return Selection(lines, text, both[0::2], both[1::2], found)


def fixed_texts(patterns: list[tuple[bytes, bytes]], vetoes: list[bytes]) -> tuple[bytes, ...]:
    """The fixed texts of (fixed text, rest) patterns, for pick(); empty when one has
    none, or when a pattern's rest or an ignore (``vetoes``) looks behind: a look-behind
    might reach the line before, which a Selection does not keep."""
    texts = tuple(literal for literal, _rest in patterns)
    behind = any(b"(?<" in rest for _lit, rest in patterns) or any(b"(?<" in v for v in vetoes)
    return () if behind or not all(texts) else texts


def can_pick(template: bytes | None, texts: tuple[bytes, ...]) -> bool:
    """Whether pick() can tell: built, a stamp of fixed width (``template`` not None),
    and fixed texts (see fixed_texts())."""
    return template is not None and bool(texts) and _select is not None


def pick(window: bytes | bytearray, stop: int, template: bytes | None,
         texts: tuple[bytes, ...]) -> Selection | None:
    """select() of ``window[1:stop]``, or None where it cannot tell (can_pick())."""
    if not can_pick(template, texts):
        return None
    return select(window, 1, stop, template, texts)
