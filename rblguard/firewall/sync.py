"""Keeping the kernel in step with the decisions: entries, restore batches, retries.

The daemon's pipeline decides *what* must be in the kernel; this module knows *how* a
ban becomes a kernel entry, how a million saved bans go back in after a restart without
building a million entries at once, and what to do when the kernel refuses a batch (the
objects were damaged or removed by hand: repair them, try once more).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice, repeat
from operator import sub

from rblguard.firewall.base import Backend, BatchResult, Entry, FirewallError
from rblguard.logs import warn_limited

log = logging.getLogger("rblguard.firewall.sync")

RESTORE_BATCH = 50_000  # entries per restore batch: bounded memory at any number of bans
_FOREVER = 1e15  # s: beyond any timeout a kernel takes; what lies past it is no time


def kernel_entry(target: str, until: float, now: float,
                 refresh: bool = True) -> Entry | None:
    """The kernel entry of a ban ending at ``until``, or None if that is not a time."""
    try:
        seconds = until - now
        if not math.isfinite(seconds):
            return None
        return Entry(target, max(1, int(seconds)), refresh)
    except (TypeError, ValueError, OverflowError):
        return None


def restore_batches(targets: Sequence[str], untils: Iterable[float | None], now: float,
                    size: int = RESTORE_BATCH) -> Iterator[list[Entry]]:
    """Each target with its until (the two side by side) as a kernel entry with its
    remaining time, ``size`` at a time.  Not refreshes: an element the kernel kept holds
    its time.  An until that is not a finite time (None, NaN, inf) is skipped, one
    already past gets 1 s, as kernel_entry gives them.  ``untils`` is read a batch at a
    time: a million bans never have a second list of a million."""
    pending = iter(untils)
    for start in range(0, len(targets), size):
        chunk_targets = targets[start:start + size]
        chunk_untils = list(islice(pending, size))
        batch = _plain_entries(chunk_targets, chunk_untils, now)
        if batch is None:  # some until is no finite time: each one looked at
            batch = [Entry(target, int(seconds) if seconds >= 1 else 1, False)
                     for target, until in zip(chunk_targets, chunk_untils, strict=True)
                     if until is not None and -_FOREVER < (seconds := until - now) < _FOREVER]
        if batch:
            yield batch


def _plain_entries(targets: Sequence[str], untils: Sequence[float | None],
                   now: float) -> list[Entry] | None:
    """The entries of ``targets`` if every until is a finite time, else None.

    A restart makes 100,000 entries before it is ready: here by C-level maps, with no
    Python step per ban; each entry made as Entry._make makes it (tuple.__new__)."""
    try:
        if not (min(untils) - now > -_FOREVER and max(untils) - now < _FOREVER):
            return None
        if any(map(math.isnan, untils)):
            return None
    except (TypeError, ValueError):  # None, not a number, or no until at all
        return None
    seconds = map(max, map(int, map(sub, untils, repeat(now))), repeat(1))
    return list(map(tuple.__new__, repeat(Entry),
                    zip(targets, seconds, repeat(False), strict=False)))


@dataclass(slots=True)
class Sent:
    """How a batch went: ``result`` None when the kernel refused the whole batch even
    after a repair (it must be tried again later); ``errors`` counts the refusals."""

    result: BatchResult | None
    errors: int = 0


def send(backend: Backend, entries: list[Entry]) -> Sent:
    """Ban a batch; on a refusal of the whole batch, repair the objects and try once
    more.  Entries refused one by one come back in ``result.failed``."""
    if not entries:
        return Sent(BatchResult())
    try:
        return Sent(backend.ban(entries))
    except FirewallError as exc:
        warn_limited(log, "firewall ban", "firewall refused a batch of %d: %s; "
                     "repairing and retrying", len(entries), exc)
    try:
        backend.ensure()
        return Sent(backend.ban(entries), errors=1)
    except FirewallError as exc:
        log.error("firewall still refuses: %s", exc)
        return Sent(None, errors=1)


def lift(backend: Backend, targets: list[str]) -> tuple[dict[str, str], int]:
    """Lift bans in the kernel: the targets it refused to lift (with why), and 1 if it
    refused the whole batch (0 otherwise), for the error counter."""
    if not targets:
        return {}, 0
    try:
        result = backend.unban(targets)
    except FirewallError as exc:
        log.error("firewall refused to lift %d ban(s): %s", len(targets), exc)
        return dict.fromkeys(targets, str(exc)), 1
    for failure in result.failed:
        log.error("firewall refused to lift %s: %s", failure.target, failure.error)
    return {f.target: f.error for f in result.failed}, 0
