"""A rule pattern's fixed start: the text the scanner searches a whole buffer for.

Every rule (and every connection line) starts with its program's own fixed text, such
as ``rblsmtpd: ``; finding that text with one search per buffer is what makes scanning
fast, and requiring it keeps a match anchored where the program, not a client, writes.
"""

from __future__ import annotations

import re

ADDR = "<ADDR>"
# What the placeholder captures: anything address-like up to a separator.  Whether it
# really is an address is decided by rblguard.addresses (a failure is a parse error, and
# never a ban), so a malformed address is counted instead of silently skipped.
ADDR_CAPTURE = r"(?P<addr>[^\s,;]+)"
# The characters a literal prefix may hold: a program's name and its separator.
_LITERAL_CHARS = re.compile(r"[A-Za-z0-9 _:@=/,'\"<>!%&#~-]")
_QUANTIFIERS = "*+?{"


def literal_prefix(pattern: str) -> str:
    """The fixed text a pattern starts with (``rblsmtpd: `` for ``rblsmtpd: <ADDR> ...``).

    The scanner searches a whole buffer for it, which is what makes scanning fast.
    """
    return split_literal(pattern)[0]


def split_literal(pattern: str) -> tuple[str, str]:
    """(fixed text the pattern starts with, the rest of the pattern after it)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith(ADDR, i):
            break
        if ch == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            step, text = 2, pattern[i + 1]
        elif _LITERAL_CHARS.fullmatch(ch) and not (ch in "<" and pattern.startswith(ADDR, i)):
            step, text = 1, ch
        else:
            break
        if i + step < len(pattern) and pattern[i + step] in _QUANTIFIERS:
            break  # "ab*": the b is optional, so only "a" is fixed
        out.append(text)
        i += step
    return "".join(out), pattern[i:]
