"""Bans from decision to kernel to state: the daemon's pipeline after the rules.

The loop hands it each chunk's matches; the pipeline asks the decider, gathers the bans
it makes, sends them to the kernel in one batch and has the journal save them with the
positions of the lines that caused them.  Control requests (ban, unban, flush) go
through the same object, on the same thread, so a ban from the CLI and a ban from the
log never race.

What it owns: the bans decided but not yet in the kernel (``pending``), the bans to log
once they are in (``announce``), which targets an admin banned (``manual``) and, through
its journal, what the kernel holds that the state does not yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

from rblguard.addresses import family
from rblguard.firewall.base import Backend, FirewallError
from rblguard.firewall.sync import kernel_entry, lift, restore_batches, send
from rblguard.logs import warn_limited
from rblguard.model import Ban, ChunkResult, Ignored, Match, SourcePosition
from rblguard.store.journal import Journal
from rblguard.store.state import StateError

log = logging.getLogger("rblguard")

# A ban decided while a large read (a burst, a backlog) is still being scanned goes to the
# kernel once the oldest such ban has waited this long, not after the read's last line.
PUSH_AFTER = 0.005
# A reject of a client within this many seconds (log time) after a DNSBL error reply for
# it is not banned: postscreen's reject line cannot show that the error reply (dnsblog's
# "as 127.255.255.254"), not a listing, made it.  At most MAX_HELD clients are held.
ERROR_HOLD = 300.0
MAX_HELD = 100_000


def log_ban(ban: Ban, refreshed: bool) -> None:
    try:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ban.until))
    except (OverflowError, ValueError, OSError):
        until = repr(ban.until)  # never let a log line stop the loop
    log.info("ban %s until %s rule=%s%s reason=%s", ban.target, until,
             ban.rule, " (refresh)" if refreshed else "", ban.reason)


def log_unban(target: str, reason: str) -> None:
    log.info("unban %s reason=%s", target, reason)


class ErrorHold:
    """The clients a DNSBL error reply came for, with its log time (see ERROR_HOLD)."""

    def __init__(self) -> None:
        self.since: dict[str, float] = {}

    def note(self, address: str, when: float) -> None:
        if len(self.since) >= MAX_HELD:  # a cut-off: every client gets error replies
            self.since = {a: t for a, t in self.since.items() if t > when - ERROR_HOLD}
            if len(self.since) >= MAX_HELD:
                self.since.clear()
        self.since[address] = when

    def holds(self, address: str, when: float) -> bool:
        """Whether a reject of ``address`` at ``when`` follows an error reply for it."""
        since = self.since.get(address)
        return since is not None and since <= when <= since + ERROR_HOLD


class Pipeline:
    """Decider → kernel → journal: ``decide``, ``ban``, ``flush``, ``commit``, ``unban``."""

    def __init__(self, decider: Any, backend: Backend, journal: Journal,
                 metrics: Any) -> None:
        self.decider = decider
        self.backend = backend
        self.journal = journal
        self.metrics = metrics
        self.pending: list[Ban] = []  # decided but not yet accepted by the kernel
        self.pending_since: float | None = None  # monotonic time the oldest was decided
        self.announce: list[tuple[Ban, bool]] = []  # (ban, refresh): logged once saved
        # Pending single-address bans the decider made from nothing: no kernel element
        # to refresh.  Only trusted once the saved bans were read (else the kernel may
        # hold elements the decider does not know of, and every ban refreshes).
        self.fresh: set[str] = set()
        self.state_loaded = False
        self.latency_start: dict[str, float] = {}  # target -> its log line's time
        # Off while the start-up catches up on its backlog: a line written while the
        # daemon was down (or read again after a crash) is old, and its "latency" would
        # say how long the daemon was away, not how fast it bans.
        self.timing = False
        self.manual: set[str] = set()  # active targets whose ban an admin made
        self.lifted_allowlisted = 0  # bans lifted because their target became allowlisted
        # The fleet's hook (rblguard.daemon.fleet): bans decided from this host's own
        # log go out once the kernel took them; ``local`` holds them until then.
        self.publish: Callable[[list[Ban]], None] | None = None
        self.local: list[Ban] = []
        self.erred = ErrorHold()

    # -- from the log ------------------------------------------------------------------

    def decide(self, source: str, result: ChunkResult, policy: Callable[[str], Any],
               now: float) -> None:
        """The matches of one scanned chunk, through the decider, into ``pending``;
        ``policy(rule)`` is that rule's ban policy.  Sends early within a long read
        (PUSH_AFTER), so the first bans of a burst never wait for its last line."""
        for event in result.events:
            when = now if event.time is None else event.time
            if type(event) is not Match:
                if type(event) is Ignored and event.kind == "dnsbl-error" and event.address:
                    self.erred.note(event.address, when)
                continue
            if self.erred.since and self.erred.holds(event.address, when):
                self.metrics.refused("dnsbl_error")
                warn_limited(log, "refused dnsbl_error", "not banning %s: a DNSBL error "
                             "reply for it came first, and may have made this reject: %s",
                             event.address, event.line)
                continue
            verdict = self.decider.on_match(event, policy(event.rule), now, source)
            if verdict.refused:
                self.metrics.refused(verdict.refused)
                warn_limited(log, f"refused {verdict.refused}", "not banning %s (%s): %s",
                             event.address, verdict.refused, event.line)
            self.ban(verdict.bans, verdict.refreshed, event.time)
            if self.publish is not None:
                self.local.extend(verdict.bans)
            if self.pending:
                if self.pending_since is None:
                    self.pending_since = time.monotonic()
                elif time.monotonic() - self.pending_since >= PUSH_AFTER:
                    self.flush(save=False)

    def ban(self, bans: Iterable[Ban], refreshed: bool, since: float | None = None,
            quiet: bool = False) -> None:
        """Queue decided bans for the kernel; ``since`` is their line's time (latency).
        ``quiet``: not logged nor counted one by one (the fleet's bans: a resync brings
        100,000 at once; rblguard.daemon.fleet logs and counts them)."""
        for ban in bans:
            self.pending.append(ban)
            if not quiet:
                self.announce.append((ban, refreshed))
            if refreshed:  # maybe of a ban in this very batch: reset it too
                self.fresh.discard(ban.target)
            elif "/" not in ban.target and self.state_loaded:
                self.fresh.add(ban.target)  # no element yet: no need to reset its clock
            if since is not None and self.timing:
                self.latency_start.setdefault(ban.target, since)

    def read(self, position: SourcePosition) -> None:
        self.journal.read(position)


    # -- to the kernel and the state ---------------------------------------------------

    def flush(self, save: bool = True) -> dict[str, str] | None:
        """Send every pending ban to the kernel in one batch, then (``save``) commit at
        once (the loop passes False and commits at its own pace, see Journal.commit).

        Returns the targets that failed for good with why, or None if the kernel
        refused the whole batch (it stays pending and is tried again).  A ban that
        cannot be a kernel entry at all (its end is not a usable time) is dropped with
        an error, never kept pending.
        """
        bans = self.pending
        failed: dict[str, str] = {}
        if bans:
            refused = self._send(bans, failed)
            if refused is None:  # the kernel refused the batch: keep them, retry later
                self.pending = [b for b in bans if b.target not in failed]
                self.pending_since = time.monotonic()  # not again on the very next line
                return None
            failed.update(refused)
            bans = [b for b in bans if b.target not in failed]
            self.pending, self.pending_since = [], None
            for ban in bans:  # mirror the state's rule column: who made the ban in force
                (self.manual.add if ban.rule == "manual" else self.manual.discard)(ban.target)
            if self.publish is not None and self.local:
                own, self.local = [b for b in self.local if b.target not in failed], []
                self.publish(own)
        self.journal.kernel_took(bans)
        if failed:  # never logged as banned
            self.announce = [(b, r) for b, r in self.announce if b.target not in failed]
        if save:
            self.commit(force=True)
        return failed

    def _send(self, bans: list[Ban], failed: dict[str, str]) -> dict[str, str] | None:
        now = time.time()
        entries = []
        fresh, self.fresh = self.fresh, set()
        for ban in bans:
            entry = kernel_entry(ban.target, ban.until, now, ban.target not in fresh)
            if entry is None:
                failed[ban.target] = f"its end {ban.until!r} is not a usable time"
                log.error("dropping the ban of %s (rule %s): its end %r is not a "
                          "usable time", ban.target, ban.rule, ban.until)
                self.metrics.refused("invalid")
                self.decider.unban(ban.target)
            else:
                entries.append(entry)
        refused = self.to_kernel(entries)
        committed = time.time()
        for start in self.latency_start.values():
            self.metrics.ban_latency(max(0.0, committed - start))
        self.latency_start = {}
        return refused

    def to_kernel(self, entries: list[Any]) -> dict[str, str] | None:
        """Ban a batch; the targets refused for good (with the kernel's words), or None
        when the whole batch must be tried again."""
        sent = send(self.backend, entries)
        for _ in range(sent.errors):
            self.metrics.firewall_error("ban")
        if sent.result is None:
            return None
        for failure in sent.result.failed:
            reason = "set_full" if failure.reason == "set_full" else "firewall"
            self.metrics.refused(reason)
            warn_limited(log, f"failed {reason}", "kernel refused %s: %s",
                         failure.target, failure.error)
        return {f.target: f.error for f in sent.result.failed}

    def commit(self, force: bool = False) -> list[SourcePosition]:
        """Save the bans now in the kernel with the positions after their lines, then
        log them.  Nothing is saved while the kernel refuses a batch: a position must
        never get ahead of a ban that is not in the kernel.  The positions saved."""
        if self.pending:
            return []
        positions = self.journal.commit(force)
        for ban, refreshed in self.announce:
            self.metrics.ban(ban.rule, family(ban.target))
            log_ban(ban, refreshed)
        self.announce = []
        return positions

    def load(self, now: float) -> None:
        """The running bans and the offender history, streamed from the state into the
        decider (a million of each never sit in memory twice)."""
        state = self.journal.state
        if state is None:
            return
        manual: set[str] = set()
        try:
            manual = state.manual_targets(now)
            self.decider.load_active(chain.from_iterable(state.active_ban_chunks(now)))
            self.decider.load((), state.each_offender())
            self.state_loaded = True
        except StateError as exc:
            log.error("%s; going on with the bans read so far", exc)
        self.manual = manual

    def restore(self, now: float) -> int:
        """Every active ban back into the kernel (start-up, repair); how many."""
        restored = 0
        targets = self.decider.active_targets()
        for batch in restore_batches(targets, self.decider.untils(targets), now):
            self.to_kernel(batch)
            restored += len(batch)
        return restored

    # -- for the admin -----------------------------------------------------------------

    def ban_now(self, verdict: Any, previous: float | None) -> Ban:
        """An admin's ban, in the kernel and saved before this returns; FirewallError
        (and the ban in force before, ``previous``, kept) if the kernel refuses it."""
        ban = verdict.bans[0]
        self.pending.extend(verdict.bans)
        failed = self.flush()
        if failed is None or ban.target in failed:
            # Not in the kernel: take it back out of memory (and out of the retry
            # queue), so list, status and the state never show a ban that is not there.
            self.pending = [b for b in self.pending if b is not ban]
            self.decider.restore(ban.target, previous)
            why = "it refused the whole batch" if failed is None else failed[ban.target]
            outcome = ("nothing was banned" if previous is None
                       else "the ban already in force is unchanged")
            raise FirewallError(f"the kernel did not take the ban of {ban.target}: "
                                f"{why}; {outcome}")
        self.metrics.ban(ban.rule, family(ban.target))
        log_ban(ban, verdict.refreshed)
        return ban

    def unban(self, targets: list[str], reason: str | Callable[[str], str],
              kind: str = "manual", kernel_too: Iterable[str] = ()) -> dict[str, str]:
        """Lift ``targets`` everywhere: decider, pending, kernel and state (one batch
        each); log each with its reason and count them by ``kind`` (a label of
        rblguard_unbans_total).  ``kernel_too`` are lifted from the kernel and the
        state only (no ban the decider knows).  Returns what the kernel refused."""
        others = [t for t in dict.fromkeys(kernel_too) if t not in set(targets)]
        gone = set(targets) | set(others)
        if targets:
            self.metrics.unbanned(kind, len(targets))
        for target in targets:
            self.decider.unban(target)
            self.manual.discard(target)
            log_unban(target, reason if isinstance(reason, str) else reason(target))
        self.pending = [b for b in self.pending if b.target not in gone]
        self.local = [b for b in self.local if b.target not in gone]
        self.announce = [(b, r) for b, r in self.announce if b.target not in gone]
        self.journal.forget_pending(gone)
        refused, errors = lift(self.backend, [*targets, *others])
        for _ in range(errors):
            self.metrics.firewall_error("ban")
        if gone:
            self.journal.save("save unban", unbans=[*targets, *others])
        return refused

    def clear(self) -> int:
        """``rblguard flush``: every ban lifted, in the kernel and the state; how many."""
        targets = self.decider.active_targets()
        self.decider.flush()
        self.pending, self.announce = [], []
        self.manual.clear()
        self.backend.flush()
        self.journal.flush(targets)
        self.metrics.unbanned("flush", len(targets))
        log_unban("*", f"flush of {len(targets)} bans")
        return len(targets)



def lift_allowlisted(pipe: Pipeline, allowlist: Any, old: Any) -> list[str]:
    """Lift every active ban on a target ``allowlist`` holds (a network: one holding
    an allowlisted address).  An admin's own ban (``rblguard ban``, maybe
    ``--force``) is kept unless this change allowlisted it (``old`` is the allowlist
    before a reload; None at start-up, when nobody knows)."""
    hits = allowlist.overlapping(pipe.decider.active_targets())
    kept = [t for t in hits if t in pipe.manual
            and (old is None or old.overlapping([t]))]
    lifted = [t for t in hits if t not in set(kept)]
    if kept:
        log.warning("keeping %d admin ban(s) on allowlisted targets: %s; "
                    "`rblguard unban TARGET` lifts one", len(kept),
                    ", ".join(kept[:10]) + (" ..." if len(kept) > 10 else ""))
    if lifted:
        pipe.unban(lifted, lambda t: f"allowlisted ({allowlist.reason(t)})",
                   "allowlisted")
        pipe.lifted_allowlisted += len(lifted)
        log.info("lifted %d ban(s) on allowlisted targets", len(lifted))
    return lifted


def housekeeping(pipe: Pipeline, now: float) -> None:
    """Expire bans, repair damaged firewall objects, refresh the kernel's counters."""
    pipe.manual.difference_update(pipe.decider.expire(now))
    health = pipe.backend.health()
    pipe.metrics.firewall_health(health.ok)
    if not health.ok:
        log.warning("firewall objects damaged (%s): restoring them with %d bans",
                    "; ".join(health.problems),
                    sum(pipe.decider.active_counts().values()))
        pipe.metrics.firewall_error("health")
        try:
            pipe.backend.ensure()
            pipe.restore(now)
        except FirewallError as exc:
            log.error("cannot restore firewall objects: %s", exc)
    try:
        pipe.metrics.set_kernel_counters(pipe.backend.counters())
    except FirewallError as exc:
        pipe.metrics.firewall_error("counters")
        warn_limited(log, "counters", "cannot read firewall counters: %s", exc)
    pipe.metrics.set_active(pipe.decider.active_counts())
