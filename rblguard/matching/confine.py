"""Rule patterns kept to one line: the rewrite that makes a match unable to cross a newline.

A rule is about one log line, but the scanner runs it over a buffer of many lines:
``[^=]*`` or ``\\s`` would otherwise run on into the next line, whose text a client may
have chosen.  So every construct that could match a newline is made not to (``.`` and
negated classes exclude it, ``\\s`` becomes ``[^\\S\\n]``, ``\\Z`` is ``$``); what cannot
be kept to one line, or would mean something else in the buffer than in a single line,
is refused: a newline itself, numbered back-references (the scanner puts the stamp's
groups first, so ``\\1`` would not be the rule's group), ``^`` and ``\\A`` after the
start, verbose mode.
"""

from __future__ import annotations

import re

RESERVED_GROUP_PREFIX = "rblguard_"  # group names the scanner adds to a rule's pattern
_OCTAL = "01234567"
_DIGITS = "0123456789"
_FLAGS = re.compile(r"\(\?([aiLmsux]*)(?:-[imsx]*)?[:)]")
_CONDITION = re.compile(r"\(\?\(([^)]*)\)")
_GROUP_NAME = re.compile(r"\(\?P<([^>]*)>")
_WITHIN_LINE = {"s": r"[^\S\n]", "D": r"[^\d\n]", "W": r"[^\w\n]", "Z": "$"}
_ONE_LINE = "a pattern is matched within one log line"


class ConfineError(ValueError):
    """A construct that cannot be kept to one line; the message says which and why."""


def within_line(pattern: str) -> str:
    """``pattern`` rewritten so that it can neither match nor look across a line end;
    ConfineError for what cannot be (see the module's docstring)."""
    if "\n" in pattern:
        raise ConfineError(f"holds a newline: {_ONE_LINE}")
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            text, i = _escape(pattern, i)
        elif ch == "[":
            text, i = _char_class(pattern, i)
        elif ch == ".":
            text, i = "[^\\n]", i + 1  # the same as "." without DOTALL, and with it
        elif ch == "^":
            raise ConfineError("'^' after the start: a match is anchored at the message "
                               "start already, and an ignore is searched after the match")
        elif ch == "(" and pattern.startswith("(?", i):
            text, i = _extension(pattern, i)
        else:
            text, i = ch, i + 1
        out.append(text)
    return "".join(out)


def _escape(pattern: str, i: int) -> tuple[str, int]:
    nxt = pattern[i + 1]
    if nxt in _DIGITS:
        return _digits(pattern, i)
    if nxt == "n" or (nxt == "x" and pattern[i + 2:i + 4].lower() == "0a"):
        raise ConfineError(f"'{pattern[i:i + (2 if nxt == 'n' else 4)]}' is a newline: "
                           f"{_ONE_LINE}")
    if nxt == "A":
        raise ConfineError("\\A: a match is anchored at the message start already, and "
                           "an ignore is searched after the match")
    return _WITHIN_LINE.get(nxt, pattern[i:i + 2]), i + 2


def _digits(pattern: str, i: int) -> tuple[str, int]:
    """Python's rule: \\0, \\0o, \\0oo and \\ooo are octal; \\d and \\dd refer to a group."""
    n, nxt, j = len(pattern), pattern[i + 1], i + 2
    if nxt == "0":
        while j < min(i + 4, n) and pattern[j] in _OCTAL:
            j += 1
    elif len(octal := pattern[i + 1:i + 4]) == 3 and all(c in _OCTAL for c in octal):
        j = i + 4
    else:
        while j < min(i + 3, n) and pattern[j] in _DIGITS:
            j += 1
        raise ConfineError(f"numbered back-reference '{pattern[i:j]}': name the group, "
                           "(?P<name>...), and refer to it as (?P=name)")
    if int(pattern[i + 1:j], 8) == 10:
        raise ConfineError(f"'{pattern[i:j]}' is a newline: {_ONE_LINE}")
    return pattern[i:j], j


def _char_class(pattern: str, i: int) -> tuple[str, int]:
    n, j = len(pattern), i + 1
    negated = pattern.startswith("^", j)
    j += negated
    if pattern.startswith("]", j):  # a "]" first in a class is a literal
        j += 1
    while j < n and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    if j >= n:  # unterminated: compiling reports it
        return pattern[i:], n
    body = pattern[i + 1 + negated:j]
    if negated:
        # [^...] would match a newline: exclude it (a leading "]" or "-" is escaped, so
        # that the "\n" put before it does not start a range).
        return "[^\\n" + ("\\" if body[:1] in ("]", "-") else "") + body + "]", j + 1
    if _class_matches_newline("[" + body + "]"):
        return "(?:(?!\\n)[" + body + "])", j + 1
    return pattern[i:j + 1], j + 1


def _extension(pattern: str, i: int) -> tuple[str, int]:
    """A ``(?...`` construct: comments kept, what means something else refused."""
    if pattern.startswith("(?#", i):  # a comment, up to the first ")"
        j = pattern.find(")", i)
        j = len(pattern) if j < 0 else j + 1
        return pattern[i:j], j
    name = _GROUP_NAME.match(pattern, i)
    if name is not None and name.group(1).startswith(RESERVED_GROUP_PREFIX):
        raise ConfineError(f"group name {name.group(1)!r}: names starting with "
                           f"{RESERVED_GROUP_PREFIX!r} are rblguard's own")
    condition = _CONDITION.match(pattern, i)
    if condition is not None and condition.group(1).strip().isdigit():
        raise ConfineError(f"numbered group condition '{condition.group(0)}': name the "
                           "group, (?P<name>...), and test it as (?(name)...)")
    flags = _FLAGS.match(pattern, i)
    if flags is not None and "x" in flags.group(1):
        raise ConfineError("verbose mode (?x) is not supported in rule patterns")
    return "(?", i + 2


def _class_matches_newline(source: str) -> bool:
    try:
        return re.compile(source.encode()).match(b"\n") is not None
    except (re.error, UnicodeEncodeError):
        return False  # compiling the whole pattern reports the problem
