"""What Scanner.tally() counts with: its patterns, and the pieces around them.

``rblguard scan`` counts a rule's hits with one findall per buffer instead of an event
per line.  Its patterns are the scanner's, anchored the same way (``anchored``), minus
the stamp's groups and plus the rest of the line, so findall returns little more than
the addresses and the text an ignore would veto.
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import regex

from rblguard.addresses import canonical_counts
from rblguard.matching import deadline
from rblguard.matching.confine import RESERVED_GROUP_PREFIX
from rblguard.matching.rules import ConnectionLine, Rule
from rblguard.matching.vetoes import literal_alternatives
from rblguard.model import ChunkResult, Connection, Event, Match, ParseError

FLAGS = regex.MULTILINE | regex.VERSION0  # every pattern the scanner compiles
TAIL = RESERVED_GROUP_PREFIX + "tail"  # the count pattern's group: the rest of a hit's line
_STAMP_GROUP = re.compile(rb"(?<!\\)\((?!\?)")  # a capturing "(" in a stamp's pattern


class CountPattern:
    """One rule's (or connection line's) patterns for tally().

    ``count_text`` is the anchored pattern with TAIL (``count``, ``fast``); ``full`` the
    scanner's own pattern, with the stamp's groups; ``literals`` the ignores' texts,
    when each is plain text (or ``|``); ``bare`` is ``count`` without TAIL, by ``re``
    (None where it cannot be): findall then gives the addresses alone, for the lines
    the prefilter picked (Scanner._tally_buffer).
    """

    def __init__(self, source: Rule | ConnectionLine, count_text: bytes,
                 full: regex.Pattern, literals: list[bytes] | None,
                 bare: re.Pattern | None = None) -> None:
        self.source = source
        self.count_text = count_text
        self.full = full
        self.literals = literals
        self.bare = bare

    @property
    def vetoes(self) -> bool:
        """Whether an ignore of the rule can veto a hit (then ``veto`` is a pattern)."""
        return type(self.source) is Rule and self.source.veto is not None

    # Compiled when first asked for: where the prefilter picks lines and ``bare`` is
    # usable, as on every front end's log, they are never used, and compiling them
    # was a tenth of a scan's start-up beyond the interpreter's.
    @functools.cached_property
    def veto(self) -> regex.Pattern | None:
        """The full pattern's hits that an ignore vetoes."""
        if not self.vetoes:
            return None
        return regex.compile(self.full.pattern + b"(?=[^\n]*?(?:" + self.source.veto.pattern
                             + b"))", FLAGS)

    @functools.cached_property
    def count(self) -> regex.Pattern:
        """Without the stamp's groups, with TAIL: for findall."""
        return regex.compile(self.count_text, FLAGS)

    @functools.cached_property
    def fast(self) -> re.Pattern | None:
        """``count`` compiled by ``re`` where it can be (rblguard.matching.deadline)."""
        return deadline.compile_fast(self.count_text, re.MULTILINE)


def anchored(literal: bytes, stamp: bytes, rest: bytes) -> bytes:
    """A pattern that finds ``literal`` and proves it stands right after newline + stamp."""
    lit = re.escape(literal)
    return lit + b"(?<=\n" + stamp + lit + b")" + rest


def count_patterns(sources: list[tuple[Rule | ConnectionLine, bytes, bytes]],
                   full_patterns: list[tuple[Rule | ConnectionLine, regex.Pattern]],
                   stamp: bytes) -> list[CountPattern]:
    """The CountPattern of each (source, fixed text, rest of its pattern), beside its
    full pattern (Scanner's, for the stamp ``stamp``)."""
    uncaptured = _STAMP_GROUP.sub(b"(?:", stamp)  # findall: only what it counts
    made = []
    for (source, literal, rest), (_, full) in zip(sources, full_patterns, strict=True):
        anchor = anchored(literal, uncaptured, rest)
        count_text = anchor + b"(?P<" + TAIL.encode() + b">[^\n]*)"
        # Without a stamp, the newline itself can lead: the same hits (a rest never takes
        # a newline, so each line's own is left for it), found a little faster than by
        # looking behind from the fixed text, on the lines the prefilter picked.
        bare = b"\n" + re.escape(literal) + rest if not stamp else anchor
        literals = None
        if type(source) is Rule and source.ignores:
            parts = [literal_alternatives(ig.regex.pattern) for ig in source.ignores]
            if all(part is not None for part in parts):
                literals = [text for part in parts for text in part or ()]
        made.append(CountPattern(source, count_text, full, literals,
                                 deadline.compile_fast(bare, re.MULTILINE)))
    return made


def disjoint(literals: list[bytes]) -> bool:
    """True when no line can match two rules (no fixed text is a prefix of another)."""
    return not any((a != b and b.startswith(a)) or (a == b and i != j)
                   for i, a in enumerate(literals) for j, b in enumerate(literals))


def as_counts(result: ChunkResult) -> ChunkResult:
    """A scan() result in tally() form: Match and Connection events become counts."""
    counts: dict[tuple[str, str], int] = {}
    rest: list[Event] = []
    for event in result.events:
        if isinstance(event, Match):
            key = (event.rule, event.address)
            counts[key] = counts.get(key, 0) + 1
        elif isinstance(event, Connection):
            result.connection_count += 1
        else:
            rest.append(event)
    result.events, result.match_counts = rest, counts
    return result


def resolve(raw: dict[str, Counter[bytes]], offset: int
            ) -> tuple[dict[str, dict[str, int]], list[ParseError]]:
    """({rule: {canonical address: matches}}, a ParseError per match whose address is
    none, at ``offset``) of ``raw``, tally()'s matches per rule as the log spells each
    address: resolved once for all the windows they came from, not once per window."""
    by_rule: dict[str, dict[str, int]] = {}
    errors: list[ParseError] = []
    for name, found in raw.items():
        by_rule[name], unparsable = canonical_counts(found)
        for address_bytes, n in unparsable.items():
            text = address_bytes.decode("ascii", "replace")
            errors.extend(ParseError(name, text, None, offset) for _ in range(n))
    return by_rule, errors
