"""Plain data passed between rblguard's stages.

The flow is one way: sources read lines, rules turn lines into events, decisions turn
matches into bans, and the firewall backend puts bans in the kernel.  Every stage takes
and returns the small records below, so each stage can be tested alone and nothing
reaches into another stage's internals.

They are named tuples (or, where a stage fills one in, a plain class with slots), not
dataclasses: these modules are what ``rblguard scan`` imports, and ``dataclasses``
(with the ``inspect`` it imports) and the making of each dataclass were a fifth of a
scan's start-up (tests/test_layers.py keeps them out of it).
"""

from __future__ import annotations

from typing import NamedTuple

# The longest log line any stage looks at.  A reject is a few hundred bytes; a longer
# line is a client's or a broken writer's, and reading it whole would let one line
# without a newline take all memory.  The follower and the scanner skip such a line.
MAX_LINE_BYTES = 1 << 20


class Match(NamedTuple):
    """A line that a rule recognised as an RBL reject: its address deserves a ban."""

    rule: str
    address: str  # canonical: "198.18.5.124", "2001:db8::17" (never "::ffff:a.b.c.d")
    time: float | None  # Unix time from the line's stamp; None for unstamped logs
    line: str  # the message (text after stamp and syslog prefix), for logs and state
    offset: int  # byte offset just past this line's newline, in its file


class Ignored(NamedTuple):
    """A line a rule matched but one of its ignore patterns vetoed: never a ban.

    ``kind`` groups reasons for reporting: ``lookup-error`` (the DNS lookup failed),
    ``dnsbl-error`` (the DNSBL refused us: the server is being cut off) or ``other``.
    """

    rule: str
    reason: str  # the ignore pattern's name, e.g. "lookup-error", "dnsbl-error"
    kind: str  # "lookup-error" | "dnsbl-error" | "other"
    zone: str | None  # for dnsbl-error: which DNSBL answered (from its URL), if known
    address: str | None
    time: float | None
    line: str
    offset: int


class ParseError(NamedTuple):
    """A line that looks like a rule's reject but whose address does not parse."""

    rule: str
    line: str
    time: float | None
    offset: int
    reason: str = "address"  # or "timeout": the rule took too long on this line


class Connection(NamedTuple):
    """An SMTP connection a producer accepted (``tcpserver: pid N from ADDR``,
    Postfix's ``connect from``): each one cost at least one DNSBL query.
    """

    address: str
    time: float | None
    offset: int
    via: str = "tcpserver"  # the connection line that told of it


Event = Match | Ignored | ParseError | Connection


class ChunkResult:
    """What the scanner found in one buffer of complete lines, in file order.

    ``end_offset`` is the byte offset just past the last complete line consumed.
    Scanner.tally() only counts: ``match_counts`` ((rule, address) -> matches) and
    ``connection_count`` then hold what Match and Connection events would say, and
    ``events`` only the rare Ignored and ParseError events.
    """

    __slots__ = (
        "connection_count",
        "end_offset",
        "events",
        "first_time",
        "last_time",
        "lines",
        "match_counts",
    )

    def __init__(self, lines: int = 0, events: list[Event] | None = None,
                 first_time: float | None = None, last_time: float | None = None,
                 end_offset: int = 0, match_counts: dict[tuple[str, str], int] | None = None,
                 connection_count: int = 0) -> None:
        self.lines = lines
        self.events: list[Event] = [] if events is None else events
        self.first_time = first_time
        self.last_time = last_time
        self.end_offset = end_offset
        self.match_counts = match_counts
        self.connection_count = connection_count

    def __repr__(self) -> str:
        return "ChunkResult(" + ", ".join(f"{n}={getattr(self, n)!r}"
                                          for n in self.__slots__) + ")"


class Ban(NamedTuple):
    """A decision to keep ``target`` out until ``until`` (Unix time).

    ``target`` is a canonical address ("198.18.5.124", "2001:db8::17") or a network in
    CIDR form ("198.18.5.0/24", "2001:db8:1:2::/64").  ``rule`` is the rule's name, or
    "manual" for an admin's ban; ``reason`` is the log line or the admin's text.
    ``origin`` is the fleet member whose log decided it (None: this host's own).
    """

    target: str
    until: float
    rule: str
    reason: str
    origin: str | None = None


class SourcePosition(NamedTuple):
    """Where reading of one configured source stopped: enough to resume exactly there.

    ``file`` is the path the bytes came from when last read (a multilog ``current`` may
    since have been renamed to ``@....s``: ``dev``/``inode`` find it again), ``offset``
    is just past the last line whose bans are in the kernel, and ``fingerprint`` is a
    digest of the file's first bytes, so a replaced file (new content, reused inode) is
    told apart from the one we were reading.  A named tuple: the daemon makes one at
    every wake-up, and a frozen dataclass sets each field through a call.
    """

    source: str  # the configured source path
    file: str
    dev: int
    inode: int
    offset: int
    fingerprint: str


class BanPolicy(NamedTuple):
    """What a rule asks for: ``count`` matches within ``window`` seconds ban an address
    for ``duration`` seconds (None: the configured ``ban_time``)."""

    count: int = 1
    window: float = 3600.0
    duration: float | None = None


class Offender(NamedTuple):
    """How often a target (address or network) was banned, and when last."""

    target: str
    bans: int
    last_ban: float
