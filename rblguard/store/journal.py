"""The one place that keeps rblguard's durability promise.

A ban reaches the kernel before the state records it, and a saved log position is
never ahead of the bans its lines caused.  So a crash at any instant loses no ban: at
worst a restart reads a few lines again, and a ban decided again from the same line has
the same expiry.

The journal holds what is in the kernel but not yet saved, and the positions read but
not yet saved, and commits them together.  When a commit fails (disk full, read-only
file system) nothing is lost: the bans and unbans are held back and every later commit
carries them, so the first commit that works saves all of it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rblguard.logs import warn_limited
from rblguard.model import Ban, Offender, SourcePosition
from rblguard.store.state import State, StateError

log = logging.getLogger("rblguard.store.journal")

# The daemon saves at most this often: a busy log moves the positions on every wake-up
# and a wave makes a few bans in each, and one SQLite transaction per wake-up was a
# quarter of the daemon's CPU.  Waiting is safe because bans and positions wait
# together: a crash loses at most this much saving, the lines after the last saved
# position are read again, and they decide the same bans (a ban's end comes from its
# line's time; the kernel kept its elements meanwhile).
COMMIT_EVERY = 1.0


class Journal:
    """What the kernel holds that the state does not yet, saved in one transaction.

    ``still_active(target)`` says whether a held-back ban is still in force (a ban
    lifted or expired since is not saved again); ``history(bans)`` gives the offender
    rows to save with them.  Both come from the decider, which this layer must not
    import.
    """

    def __init__(self, state: State | None, still_active: Callable[[str], bool],
                 history: Callable[[Iterable[Ban]], Iterable[Offender]]) -> None:
        self.state = state
        self._still_active = still_active
        self._history = history
        self.in_kernel: list[Ban] = []  # in the kernel, not yet saved
        self.read_to: dict[str, SourcePosition] = {}  # source -> read to here, not saved
        self.unsaved_bans: dict[str, Ban] = {}  # a commit failed: carried by the next
        self.unsaved_unbans: set[str] = set()
        # The first commit is due at once: until a source's position is saved, a
        # restart would start that source at its end and skip what came meanwhile.
        self.last_commit = -math.inf

    @property
    def saving(self) -> bool:
        """False when the daemon runs without a state database."""
        return self.state is not None

    def kernel_took(self, bans: Sequence[Ban]) -> None:
        self.in_kernel.extend(bans)

    def read(self, position: SourcePosition) -> None:
        """The source's lines are read (and their bans decided) up to ``position``."""
        self.read_to[position.source] = position

    def forget_pending(self, targets: set[str]) -> None:
        """Lifted before they were saved: they must not be saved as running bans."""
        self.in_kernel = [b for b in self.in_kernel if b.target not in targets]

    @property
    def unsaved(self) -> int:
        return len(self.in_kernel)

    def due(self, now: float | None = None) -> bool:
        """Whether a commit() now would save (COMMIT_EVERY has passed)."""
        now = time.monotonic() if now is None else now
        return now - self.last_commit >= COMMIT_EVERY

    def commit(self, force: bool = False) -> list[SourcePosition]:
        """Save the bans in the kernel with the positions after their lines; the
        positions saved (or held with the bans if the save failed).  At most once per
        COMMIT_EVERY unless ``force`` (an admin's ban, a long backlog, a stop)."""
        now = time.monotonic()
        if not force and not self.due(now):
            return []
        bans, self.in_kernel = self.in_kernel, []
        positions, self.read_to = list(self.read_to.values()), {}
        if bans or positions:  # nothing to save keeps the next commit due at once
            self.last_commit = now
            self.save("save bans and position", bans=bans, positions=positions)
        return positions

    def save(self, what: str, bans: Sequence[Ban] = (), unbans: Sequence[str] = (),
             positions: Sequence[SourcePosition] = ()) -> bool:
        """Commit, together with whatever earlier failed commits held back: all of it
        is saved, or all of it waits for the next commit.  False if it waits."""
        if self.state is None:
            return True
        for ban in bans:
            self.unsaved_unbans.discard(ban.target)
        for target in unbans:
            self.unsaved_bans.pop(target, None)
        held = {**self.unsaved_bans, **{b.target: b for b in bans}}
        save = [b for t, b in held.items()
                if t not in self.unsaved_bans or self._still_active(t)]
        gone = self.unsaved_unbans | set(unbans)
        try:
            self.state.commit(bans=save, unbans=sorted(gone),
                              history=self._history(held.values()),
                              positions=list(positions))
        except StateError as exc:
            self.unsaved_bans, self.unsaved_unbans = held, gone
            warn_limited(log, "state", "cannot %s: %s (kernel bans are unaffected; "
                         "they are saved once it works again)", what, exc)
            return False
        if self.unsaved_bans or self.unsaved_unbans:
            log.info("state database %s works again: saved %d ban(s) and %d unban(s) "
                     "held back since it failed", self.state.path,
                     len(self.unsaved_bans), len(self.unsaved_unbans))
        self.unsaved_bans, self.unsaved_unbans = {}, set()
        return True

    def flush(self, targets: Iterable[str]) -> None:
        """Forget every saved ban (``rblguard flush``); if that fails, ``targets`` are
        held back as unbans, or a restart would restore the flushed bans."""
        self.in_kernel = []
        if self.state is None:
            return
        try:
            self.state.flush()  # one DELETE, however many bans
            self.unsaved_bans, self.unsaved_unbans = {}, set()
        except StateError as exc:
            self.unsaved_bans = {}
            self.unsaved_unbans |= set(targets)
            warn_limited(log, "state", "cannot save the flush: %s (kernel bans are "
                         "flushed; it is saved once the state works again)", exc)

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the state; None (and a limited warning) if it fails."""
        try:
            return fn(*args)
        except StateError as exc:
            warn_limited(log, "state", "cannot %s: %s (kernel bans are unaffected)",
                         what, exc)
            return None
