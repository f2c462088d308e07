"""Rule patterns: what a rule's regular expression may be, and its fixed start.

A rule is about one log line, but the scanner runs its pattern over a buffer of many
lines and searches first for the fixed text the pattern starts with.  So this module
both finds that text (split_literal) and rewrites a pattern so that nothing in it can
match or look across a line end (within_line).  Kept apart from the rule-file loader
(rblguard.matching.rules), which only reads YAML and reports where a file is wrong.
"""

from __future__ import annotations

import re

ADDR = "<ADDR>"
_LITERAL_CHARS = re.compile(r"[A-Za-z0-9 _:@=/,'\"<>!%&#~-]")
_QUANTIFIERS = "*+?{"
# Group names the scanner itself uses in the patterns it builds from a rule.
RESERVED_GROUP_PREFIX = "rblguard_"
_OCTAL = "01234567"
_DIGITS = "0123456789"
_FLAGS = re.compile(r"\(\?([aiLmsux]*)(?:-[imsx]*)?[:)]")
_CONDITION = re.compile(r"\(\?\(([^)]*)\)")
_GROUP_NAME = re.compile(r"\(\?P<([^>]*)>")
# What stands in for a construct that could match a line end, so that it cannot.
_WITHIN_LINE = {"s": r"[^\S\n]", "D": r"[^\d\n]", "W": r"[^\w\n]", "Z": "$"}


class RuleError(Exception):
    """A rule file cannot be used; the message names file, line and problem."""


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


def within_line(pattern: str, what: str) -> str:
    """``pattern`` rewritten so that it can neither match nor look across a line end.

    A rule is about one log line, but the scanner runs it over a buffer of many lines:
    ``[^=]*`` or ``\\s`` would otherwise run on into the next line, whose text a client
    may have chosen.  So every construct that could match a newline is made not to
    (``.`` and negated classes exclude it, ``\\s`` becomes ``[^\\S\\n]``, ``\\Z`` is
    ``$``); what cannot be kept to one line, or would mean something else in the
    buffer than in a single line, is refused: a newline itself, numbered
    back-references (the scanner puts the stamp's groups first, so ``\\1`` would not be
    the rule's group), ``^`` and ``\\A`` after the start, verbose mode.  Raises
    RuleError starting with ``what`` (``file:line: rule NAME: match``).
    """

    def refuse(problem: str) -> RuleError:
        return RuleError(f"{what}: {problem}")

    if "\n" in pattern:
        raise refuse("holds a newline: a pattern is matched within one log line")
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            nxt = pattern[i + 1]
            if nxt in _DIGITS:
                # Python's rule: \0, \0o, \0oo and \ooo are octal; \d and \dd refer to a group.
                j = i + 2
                if nxt == "0":
                    while j < min(i + 4, n) and pattern[j] in _OCTAL:
                        j += 1
                elif len(octal := pattern[i + 1:i + 4]) == 3 and all(c in _OCTAL for c in octal):
                    j = i + 4
                else:
                    while j < min(i + 3, n) and pattern[j] in _DIGITS:
                        j += 1
                    raise refuse(f"numbered back-reference '{pattern[i:j]}': name the group, "
                                 "(?P<name>...), and refer to it as (?P=name)")
                if int(pattern[i + 1:j], 8) == 10:
                    raise refuse(f"'{pattern[i:j]}' is a newline: a pattern is matched "
                                 "within one log line")
                out.append(pattern[i:j])
                i = j
                continue
            if nxt == "n" or (nxt == "x" and pattern[i + 2:i + 4].lower() == "0a"):
                raise refuse(f"'{pattern[i:i + (2 if nxt == 'n' else 4)]}' is a newline: "
                             "a pattern is matched within one log line")
            if nxt == "A":
                raise refuse("\\A: a match is anchored at the message start already, and an "
                             "ignore is searched after the match")
            out.append(_WITHIN_LINE.get(nxt, pattern[i:i + 2]))
            i += 2
        elif ch == "[":
            j = i + 1
            negated = pattern.startswith("^", j)
            j += negated
            if pattern.startswith("]", j):  # a "]" first in a class is a literal
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            if j >= n:  # unterminated: compiling reports it
                out.append(pattern[i:])
                break
            body = pattern[i + 1 + negated:j]
            if negated:
                # [^...] would match a newline: exclude it (a leading "]" or "-" is
                # escaped, so that the "\n" put before it does not start a range).
                out.append("[^\\n" + ("\\" if body[:1] in ("]", "-") else "") + body + "]")
            elif _class_matches_newline("[" + body + "]"):
                out.append("(?:(?!\\n)[" + body + "])")
            else:
                out.append(pattern[i:j + 1])
            i = j + 1
        elif ch == ".":
            out.append("[^\\n]")  # the same as "." without DOTALL, and with it
            i += 1
        elif ch == "^":
            raise refuse("'^' after the start: a match is anchored at the message start "
                         "already, and an ignore is searched after the match")
        elif ch == "(" and pattern.startswith("(?", i):
            if pattern.startswith("(?#", i):  # a comment, up to the first ")"
                j = pattern.find(")", i)
                j = n if j < 0 else j + 1
                out.append(pattern[i:j])
                i = j
                continue
            name = _GROUP_NAME.match(pattern, i)
            if name is not None and name.group(1).startswith(RESERVED_GROUP_PREFIX):
                raise refuse(f"group name {name.group(1)!r}: names starting with "
                             f"{RESERVED_GROUP_PREFIX!r} are rblguard's own")
            condition = _CONDITION.match(pattern, i)
            if condition is not None and condition.group(1).strip().isdigit():
                raise refuse(f"numbered group condition '{condition.group(0)}': name the "
                             "group, (?P<name>...), and test it as (?(name)...)")
            flags = _FLAGS.match(pattern, i)
            if flags is not None and "x" in flags.group(1):
                raise refuse("verbose mode (?x) is not supported in rule patterns")
            out.append("(?")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _class_matches_newline(source: str) -> bool:
    try:
        return re.compile(source.encode()).match(b"\n") is not None
    except (re.error, UnicodeEncodeError):
        return False  # compiling the whole pattern reports the problem
