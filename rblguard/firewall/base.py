"""The one interface every firewall backend offers the daemon and the CLI.

Bans live in the kernel with kernel timeouts: the kernel expires them by itself, so a
backend never needs a timer of its own.  Every call takes a whole batch, because one
call (one transaction, one process at most) per batch is what keeps up with a botnet
wave; one process per ban does not.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

# Why the kernel refused an entry, as a code callers can count and act on: the backend
# reads its tool's own error once, here at the edge, so nobody matches message text.
INVALID = "invalid"  # not an address or network
SET_FULL = "set_full"  # the set reached its size limit
OVERLAP = "overlap"  # an interval set refused an overlapping network
REFUSED = "firewall"  # any other refusal


@dataclass(frozen=True, slots=True)
class FirewallOptions:
    """Backend settings, parsed and checked once (by rblguard.config) and passed down."""

    backend: str = "nftables"  # "nftables" | "ipset"
    ports: tuple[int, ...] | None = (25, 465, 587)  # None: every TCP port
    # nftables
    table: str = "rblguard"  # in family inet
    priority: int = -10  # input hook; conntrack runs at -200, filter chains at 0
    # ipset
    set_v4: str = "rblguard4"
    set_v6: str = "rblguard6"
    maxelem: int = 1_048_576
    mode: str = "rules"  # "rules": rblguard adds its own iptables rules; "set-only": admin's
    chain: str = "RBLGUARD"  # iptables/ip6tables chain used in "rules" mode


class Entry(NamedTuple):
    """One ban for the kernel: an address or CIDR network and its timeout in seconds.

    A named tuple, not a frozen dataclass: a restart builds one per saved ban, and a
    tuple is made in a third of the time (tuple.__new__, no object.__setattr__ per
    field); it is as immutable."""

    target: str  # "198.18.5.124", "198.18.5.0/24", "2001:db8::17", "2001:db8:1:2::/64"
    timeout: int  # seconds, >= 1; a backend caps it at what its kernel object allows
    # The element may be there already and its clock must start again (a re-ban).  False
    # only when the caller knows it is new or holds its time already (a restore):
    # nftables then skips "expires", which costs about a fifth of an add.
    refresh: bool = True


@dataclass(slots=True)
class Listed:
    """One element found in the kernel, with the seconds it has left."""

    target: str
    expires: float


@dataclass(slots=True)
class Counters:
    """Drops by the backend's rules: new connections refused and packets dropped."""

    packets: int = 0
    connections: int = 0


@dataclass(slots=True)
class Health:
    ok: bool
    problems: list[str] = field(default_factory=list)


class Failure(NamedTuple):
    """One entry the kernel refused: its target, the kernel's words, and a reason code."""

    target: str
    error: str
    reason: str = REFUSED  # INVALID, SET_FULL, OVERLAP or REFUSED


@dataclass(slots=True)
class BatchResult:
    """How a batch went: how many entries were applied and which failed, and why."""

    done: int = 0
    failed: list[Failure] = field(default_factory=list)

    def refuse(self, target: str, error: str, reason: str = REFUSED) -> None:
        self.failed.append(Failure(target, error, reason))


class FirewallError(Exception):
    """The kernel refused an operation; the message says which object and why."""


class Backend(abc.ABC):
    """What the daemon and ``rblguard firewall`` need from a firewall."""

    name: str

    @abc.abstractmethod
    def ensure(self) -> None:
        """Create or repair all objects, idempotently, keeping elements already there."""

    @abc.abstractmethod
    def ban(self, entries: Sequence[Entry]) -> BatchResult:
        """Add or refresh every entry in one batch; a re-ban refreshes the timeout."""

    @abc.abstractmethod
    def unban(self, targets: Sequence[str]) -> BatchResult:
        """Remove every target; one that is not there does not fail the others."""

    @abc.abstractmethod
    def list(self) -> list[Listed]:
        """Every element with its remaining time."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Empty the sets, keeping the objects."""

    @abc.abstractmethod
    def remove(self) -> None:
        """Remove every object this backend owns; leave nothing behind."""

    @abc.abstractmethod
    def counters(self) -> dict[int, Counters]:
        """Drop counters per family: {4: Counters(...), 6: Counters(...)}.

        The daemon reads them every few seconds: the cost must not grow with the number
        of elements in the sets."""

    @abc.abstractmethod
    def health(self) -> Health:
        """Whether all objects are intact (tables, sets, chains, rules).

        Called every few seconds by the daemon: must not read the sets' elements."""

    def entry_counts(self) -> dict[int, int] | None:
        """Elements per family, {4: n, 6: m}, if the kernel keeps a count (ipset's set
        headers do); None if only reading every element would tell (nftables: about a
        minute for 1,000,000), which ``status`` never does."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release handles (netlink sockets, contexts)."""
