"""``rblguard run``: the daemon that joins sources, rules, decisions and the firewall.

One thread, the loop in Daemon.run(), owns every piece of state: followers, the
decider, the SQLite store and the firewall backend.  Other threads only hand it work
through one queue: the inotify watcher says "this source changed", the control socket
passes requests and waits for the answer, signals ask for a reload or a stop.  Bursts
coalesce: however many notifications arrive, each wake-up reads every changed source to
its end once and sends all the bans it found to the kernel in one batch.

Order of durability: bans go to the kernel first, then the state (bans and source
positions) is written in one transaction.  A crash at any instant therefore loses no
ban, and at worst re-reads a few lines whose bans are idempotent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from rblguard import __version__
from rblguard.addresses import family
from rblguard.config import ConfigError
from rblguard.daemon.control import ControlError
from rblguard.daemon.handlers import kernel_entry, restore_batches
from rblguard.firewall.base import Backend, Entry, FirewallError
from rblguard.matching.rules import RuleError, RuleSet, load_rules, rule_files, shipped_rules_dir
from rblguard.matching.scanner import Scanner
from rblguard.model import Ban, ChunkResult, Match, SourcePosition
from rblguard.sources.stamps import StampFormat, detect_format

log = logging.getLogger("rblguard")

READ_BYTES = 4 << 20  # per source per wake-up: keeps a backlog from starving the socket
TICK = 1.0  # seconds: safety-net re-read of every source, rule-file and tcprules check
# A ban decided while a large read (a burst, a backlog) is still being scanned goes to the
# kernel once the oldest such ban has waited this long, not after the read's last line.
PUSH_AFTER = 0.005
# Bans in the kernel but not yet in the state: saved (with their positions) once every
# source is read to its end, or once this many wait (a long backlog).
SAVE_EVERY = 10_000
SAVE_AFTER = 0.5  # seconds: under a constant stream of lines, the state is saved this often
HOUSEKEEPING = 5.0  # seconds: firewall health (self-repair), counters, expiry
RELOAD = object()  # the queue item SIGHUP sends (a str would be taken for a source)
# Config keys a reload applies; the others (backend, sources, ...) need a restart.
RELOADED_KEYS = ("allowlist", "tcprules", "rules_dirs", "shipped_rules", "packs")


@dataclass
class _Request:
    """A control request waiting for the main loop's answer."""

    body: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class _SourceState:
    follower: Any  # rblguard.follow.Follower
    formats: dict[tuple[int, int], StampFormat] = field(default_factory=dict)
    last_time: float | None = None
    position: SourcePosition | None = None


class Daemon:
    """Everything ``rblguard run`` does, driven by run()."""

    def __init__(self, config: Any, config_path: str, config_explicit: bool = True) -> None:
        self.config = config
        self.config_path = config_path
        self.config_explicit = config_explicit  # named with --config: it must exist
        self.wakeups: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.started = time.time()
        self.dirty: set[str] = set()
        self.pending: list[Ban] = []  # decided but not yet accepted by the kernel
        self.pending_since: float | None = None  # monotonic time the oldest was decided
        self.announce: list[tuple[Ban, bool]] = []  # (ban, refresh): logged once in kernel
        # In the kernel, not yet saved: saved with the positions after their lines.
        self.in_kernel: list[Ban] = []
        self.read_to: dict[str, SourcePosition] = {}  # source -> read to here, not saved
        # Pending single-address bans the decider made from nothing: no kernel element to
        # refresh.  Only trusted once the saved bans were read (else the kernel may hold
        # elements the decider does not know of, and every ban refreshes).
        self.fresh: set[str] = set()
        self.state_loaded = False
        self.last_commit = time.monotonic()
        self.deferred: list[Any] = []  # wake-ups taken early by _more_came: for _wait
        # In the kernel (or lifted from it) but not in the state: a commit failed (disk
        # full, read-only).  Every later commit carries them, so a saved position never
        # gets ahead of a ban that its lines caused.
        self.unsaved_bans: dict[str, Ban] = {}
        self.unsaved_unbans: set[str] = set()
        self.state: Any = None
        self.backend: Backend | None = None
        self.rule_mtimes: dict[str, float] = {}
        self.tcprules_mtime: float | None = None
        self.latency_start: dict[str, float] = {}  # target -> its log line's time
        self.manual: set[str] = set()  # active targets whose ban an admin made
        self.lifted_allowlisted = 0  # bans lifted because their target became allowlisted
        self.metrics: Any = None
        self.watcher: Any = None

    # -- start-up --------------------------------------------------------------------

    def start(self, serve_metrics: bool = False) -> None:
        """Everything before the loop.  ``serve_metrics`` opens the metrics port first
        of all, so a taken port stops start-up before the firewall or state is touched."""
        from rblguard.daemon.metrics import Metrics
        from rblguard.decisions.allowlist import Allowlist
        from rblguard.decisions.decider import Decider, DecisionSettings
        from rblguard.firewall import make_backend
        from rblguard.sources.follow import Follower

        cfg = self.config
        self.ruleset = self._load_rules()
        self.scanner = Scanner(self.ruleset)
        self.metrics = Metrics(zones=cfg.dnsbl.zones,
                               connections_per_day=cfg.dnsbl.connections_per_day,
                               queries_per_day=cfg.dnsbl.queries_per_day)
        self.metrics.reload(True)
        if serve_metrics and cfg.metrics:
            self.metrics.serve(cfg.metrics)
        self.allowlist = Allowlist.from_config(cfg)
        self.decider = Decider(DecisionSettings.from_config(cfg), self.allowlist)
        self._open_state()
        self.backend = make_backend(cfg.firewall)
        self.backend.ensure()
        now = time.time()
        positions: dict[str, SourcePosition] = {}
        if self.state is not None:
            self._state_call("prune", self.state.prune, now, now - self.decider.forget_after)
            self._load_saved_bans(now)
            positions = self._state_call("load positions", self.state.load_positions) or {}
            self._lift_allowlisted(None)  # the allowlist may have grown while we were down
            t0 = time.monotonic()
            restored = 0
            for batch in restore_batches(self, now):
                self._to_kernel(batch)
                restored += len(batch)
            log.info("restored %d bans into the kernel in %.3f s", restored,
                     time.monotonic() - t0)
        self.sources = {
            src: _SourceState(Follower(src, positions.get(src)), position=positions.get(src))
            for src in cfg.source_paths
        }
        for src in self.sources:
            if not os.path.exists(src):
                log.warning("source %s does not exist (yet): it is followed from its first "
                            "line as soon as it appears; check the path if it never does", src)
        self.dirty.update(self.sources)
        self._remember_rule_files()

    def _load_saved_bans(self, now: float) -> None:
        """The running bans and the offender history, streamed from the state into the
        decider (a million of each never sit in memory twice)."""
        from rblguard.store.state import StateError

        assert self.state is not None
        manual: set[str] = set()

        def running() -> Iterator[tuple[str, float]]:
            for target, until, by_admin in self.state.each_active_ban(now):
                if by_admin:
                    manual.add(target)
                yield target, until

        try:
            self.decider.load_active(running())
            self.decider.load((), self.state.each_offender())
            self.state_loaded = True
        except StateError as exc:
            log.error("%s; going on with the bans read so far", exc)
        self.manual = manual

    def _load_rules(self, config: Any = None) -> RuleSet:
        config = config or self.config
        dirs = ([shipped_rules_dir()] if config.shipped_rules else []) + [
            d for d in config.rules_dirs if os.path.isdir(d)]
        return load_rules(dirs, require_enabled=True, packs=config.packs)

    def _open_state(self) -> None:
        from rblguard.store.state import State, StateError

        try:
            self.state = State(self.config.state_dir)
        except StateError as exc:
            log.error("%s; running without saved state: bans stay in the kernel but "
                      "will not survive a restart", exc)
            self.state = None

    def _state_call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        from rblguard.store.state import StateError

        try:
            return fn(*args, **kw)
        except StateError as exc:
            self.limited_warning("state", "cannot %s: %s (kernel bans are unaffected)",
                                 what, exc)
            return None

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        from rblguard.daemon import sdnotify
        from rblguard.daemon.control import ControlServer
        from rblguard.sources.follow import SourceWatcher

        # The socket first: a second rblguard on the same socket stops here, before it
        # touches the firewall or the state of the one already running.  Requests wait
        # in the queue until the loop below answers them.
        self.control = ControlServer(self.config.control_socket, self._control_request)
        self.control.start()
        ready = False
        try:
            self.start(serve_metrics=True)
            self.watcher = SourceWatcher(list(self.sources), self._source_changed)
            self.watcher.start()
            self._install_signals()
            self._pump()  # the backlog up to now, before we call ourselves ready
            sdnotify.ready()
            ready = True
            sdnotify.status(f"following {len(self.sources)} source(s)")
            assert self.backend is not None
            log.info("rblguard %s ready: %d source(s), %d rule(s), backend %s", __version__,
                     len(self.sources), len(self.ruleset.rules), self.backend.name)
            watchdog = sdnotify.watchdog_interval()
            next_tick = next_house = time.monotonic()
            while not self.stopping.is_set():
                timeout = max(0.0, min(next_tick, next_house) - time.monotonic())
                self._wait(timeout)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + TICK
                    self.dirty.update(self.sources)
                    self._check_reload_triggers()
                self._pump()
                if now >= next_house:
                    next_house = now + (min(HOUSEKEEPING, watchdog / 2) if watchdog
                                        else HOUSEKEEPING)
                    self._housekeeping()
                    sdnotify.watchdog()
        finally:
            sdnotify.stopping()
            if self.watcher is not None:
                self.watcher.stop()
            self.control.stop()
            if self.metrics is not None:
                self.metrics.close()
            if self.backend is not None:
                self.backend.close()
            if ready:
                log.info("rblguard stopped; bans stay in the kernel until they expire")
        return 0

    def _wait(self, timeout: float) -> None:
        """Block for the first wake-up, then drain every other one already queued."""
        items, self.deferred = self.deferred, []
        try:
            if not items:
                items.append(self.wakeups.get(timeout=timeout))
            while True:
                items.append(self.wakeups.get_nowait())
        except queue.Empty:
            pass
        for item in items:
            if item is RELOAD:
                self.reload()
            elif isinstance(item, str):
                self.dirty.add(item)
            elif isinstance(item, _Request):
                self._answer(item)

    def _source_changed(self, source: str) -> None:  # watchdog's thread
        self.wakeups.put(source)

    def _install_signals(self) -> None:
        def stop(_sig: int, _frame: Any) -> None:
            self.stopping.set()
            self.wakeups.put(None)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.wakeups.put(RELOAD))

    # -- sources -> rules -> decisions -> kernel -------------------------------------

    def _pump(self) -> None:
        """Read every dirty source to its end, ban what it holds, then save positions."""
        read_sources: set[str] = set()  # sources that gave lines in this round
        while self.dirty:
            source = self.dirty.pop()
            st = self.sources.get(source)
            if st is None:  # not one of ours: never let a stray wake-up stop the loop
                continue
            more = True
            while more and not self.stopping.is_set():
                try:
                    chunks = st.follower.read(READ_BYTES)
                except OSError as exc:
                    self.limited_warning(f"read {source}", "cannot read %s: %s", source, exc)
                    break
                more = sum(len(c.data) for c in chunks) >= READ_BYTES
                for chunk in chunks:
                    self._process(source, st, chunk)
                if chunks:
                    self.read_to[source] = chunks[-1].position(source)
                    read_sources.add(source)
                self._flush_bans(save=False)
                if len(self.in_kernel) >= SAVE_EVERY:
                    self._commit_reads()
            if not self.dirty and self._more_came(read_sources):
                continue
        self._commit_reads()

    def _more_came(self, read_sources: set[str]) -> bool:
        """Before saving and logging: did more lines come while we read?  A burst often
        arrives in pieces (multilog writes as it reads), and the commit and the journal
        lines of one piece must not hold up the bans of the next.  Source wake-ups
        queued meanwhile are taken, and the sources just read are read once more;
        anything else queued (a control request, a signal) waits for the main loop.
        At least every SAVE_AFTER seconds the state is saved all the same."""
        if time.monotonic() - self.last_commit >= SAVE_AFTER or not read_sources:
            return False
        try:
            while True:
                item = self.wakeups.get_nowait()
                if isinstance(item, str):
                    self.dirty.add(item)
                else:
                    self.deferred.append(item)
        except queue.Empty:
            pass
        self.dirty |= read_sources
        read_sources.clear()
        return True

    def _commit_reads(self) -> None:
        """Save the bans now in the kernel with the positions after their lines, in one
        transaction, then log them: after every source was read and its bans sent, so
        neither the state nor the journal delays a ban of a burst that came in pieces.
        Nothing is saved while the kernel refuses a batch: a position must never get
        ahead of a ban that is not in the kernel."""
        if self.pending or not (self.in_kernel or self.read_to or self.announce):
            return
        for source, position in self.read_to.items():
            self.sources[source].position = position
        self.last_commit = time.monotonic()
        bans, self.in_kernel = self.in_kernel, []
        positions, self.read_to = list(self.read_to.values()), {}
        if bans or positions:
            self._save("save bans and position", bans=bans, positions=positions)
        for ban, refreshed in self.announce:
            self.metrics.ban(ban.rule, family(ban.target))
            self.log_ban(ban, refreshed)
        self.announce = []

    def _process(self, source: str, st: _SourceState, chunk: Any) -> None:
        key = (chunk.dev, chunk.inode)
        fmt = st.formats.get(key)
        if fmt is None:
            fmt = st.formats[key] = detect_format(chunk.data)
            if len(st.formats) > 64:
                st.formats.pop(next(iter(st.formats)))
        result: ChunkResult = self.scanner.scan(chunk.data, chunk.start, fmt, time.time())
        self.metrics.observe_chunk(source, result)
        if result.last_time is not None:
            st.last_time = result.last_time
        now = time.time()
        for event in result.events:
            if type(event) is not Match:
                continue
            rule = self.ruleset.by_name(event.rule)
            verdict = self.decider.on_match(event, rule.policy, now, source)
            if verdict.refused:
                self.metrics.refused(verdict.refused)
                self.limited_warning(f"refused {verdict.refused}",
                                     "not banning %s (%s): %s", event.address,
                                     verdict.refused, event.line)
            for ban in verdict.bans:
                self.pending.append(ban)
                self.announce.append((ban, verdict.refreshed))
                if verdict.refreshed:  # maybe of a ban in this very batch: reset it too
                    self.fresh.discard(ban.target)
                elif "/" not in ban.target and self.state_loaded:
                    self.fresh.add(ban.target)  # no element yet: no need to reset its clock
                if event.time is not None:
                    self.latency_start.setdefault(ban.target, event.time)
            if self.pending:
                if self.pending_since is None:
                    self.pending_since = time.monotonic()
                elif time.monotonic() - self.pending_since >= PUSH_AFTER:
                    self._flush_bans(save=False)  # the rest of a burst must not hold it

    def _flush_bans(self, save: bool = True) -> dict[str, str] | None:
        """Send every pending ban to the kernel in one batch, then (``save``) record
        them with _commit_reads.

        Bans and the source positions after the lines that caused them are written in
        one transaction, and only once the kernel has the bans: a crash before it
        re-reads those lines (bans are idempotent), a crash after it re-reads nothing.
        ``save=False`` (mid-read) only puts them in the kernel; _pump saves them with
        its positions once every source is read.
        Returns the targets that failed for good with why, or None if the kernel
        refused the whole batch (it stays pending and is tried again).  A ban that
        cannot be a kernel entry at all (its end is not a usable time) is dropped with
        an error, never kept pending.
        """
        bans = self.pending
        failed: dict[str, str] = {}
        if bans:
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
            refused = self._to_kernel(entries)
            committed = time.time()
            for start in self.latency_start.values():
                self.metrics.ban_latency(max(0.0, committed - start))
            self.latency_start = {}
            if refused is None:  # the kernel refused the batch: keep them, retry later
                self.pending = [b for b in bans if b.target not in failed]
                self.pending_since = time.monotonic()  # not again on the very next line
                return None
            failed.update(refused)
            bans = [b for b in bans if b.target not in failed]
            self.pending = []
            self.pending_since = None
            for ban in bans:  # mirror the state's rule column: who made the ban in force
                if ban.rule == "manual":
                    self.manual.add(ban.target)
                else:
                    self.manual.discard(ban.target)
        self.in_kernel.extend(bans)
        if failed:  # never logged as banned by _commit_reads
            self.announce = [(b, r) for b, r in self.announce if b.target not in failed]
        if save:
            self._commit_reads()
        return failed

    def _save(self, what: str, bans: Sequence[Ban] = (), unbans: Sequence[str] = (),
              positions: Sequence[SourcePosition] = ()) -> None:
        """Commit to the state, together with whatever earlier failed commits held back:
        all of it is saved, or all of it waits for the next commit."""
        from rblguard.store.state import StateError

        if self.state is None:
            return
        for ban in bans:
            self.unsaved_unbans.discard(ban.target)
        for target in unbans:
            self.unsaved_bans.pop(target, None)
        held = {**self.unsaved_bans, **{b.target: b for b in bans}}
        # a held-back ban lifted or expired since (flush, expiry) is not saved; its
        # offender history still is
        save = [b for t, b in held.items()
                if t not in self.unsaved_bans or self.decider.until(t) is not None]
        gone = self.unsaved_unbans | set(unbans)
        try:
            self.state.commit(bans=save, unbans=sorted(gone),
                              history=self.decider.history_updates(held.values()),
                              positions=list(positions))
        except StateError as exc:
            self.unsaved_bans, self.unsaved_unbans = held, gone
            self.limited_warning("state", "cannot %s: %s (kernel bans are unaffected; "
                                 "they are saved once it works again)", what, exc)
            return
        if self.unsaved_bans or self.unsaved_unbans:
            log.info("state database %s works again: saved %d ban(s) and %d unban(s) "
                     "held back since it failed", self.state.path,
                     len(self.unsaved_bans), len(self.unsaved_unbans))
        self.unsaved_bans, self.unsaved_unbans = {}, set()

    def _to_kernel(self, entries: list[Entry]) -> dict[str, str] | None:
        """Ban a batch; the targets that failed for good (with the kernel's reason), or
        None to retry the batch."""
        if not entries:
            return {}
        assert self.backend is not None
        try:
            result = self.backend.ban(entries)
        except FirewallError as exc:
            self.metrics.firewall_error("ban")
            self.limited_warning("firewall ban", "firewall refused a batch of %d: %s; "
                                 "repairing and retrying", len(entries), exc)
            try:
                self.backend.ensure()
                result = self.backend.ban(entries)
            except FirewallError as exc2:
                log.error("firewall still refuses: %s", exc2)
                return None
        for target, error in result.failed:
            reason = "set_full" if "full" in error.lower() else "firewall"
            self.metrics.refused(reason)
            self.limited_warning(f"failed {reason}", "kernel refused %s: %s", target, error)
        return dict(result.failed)

    def _unban_in_kernel(self, targets: list[str]) -> dict[str, str]:
        """Lift bans in the kernel; the targets it refused to lift, with why."""
        assert self.backend is not None
        if not targets:
            return {}
        try:
            result = self.backend.unban(targets)
        except FirewallError as exc:
            self.metrics.firewall_error("ban")
            log.error("firewall refused to lift %d ban(s): %s", len(targets), exc)
            return dict.fromkeys(targets, str(exc))
        for target, error in result.failed:
            log.error("firewall refused to lift %s: %s", target, error)
        return dict(result.failed)

    def forget_bans(self, targets: list[str], reason: str | Callable[[str], str],
                    kind: str = "manual") -> dict[str, str]:
        """Lift ``targets`` everywhere: memory, pending, kernel and state (one batch
        each); log each one with its reason, count them by ``kind`` (a label of
        rblguard_unbans_total).  Returns those the kernel refused to lift."""
        gone = set(targets)
        if targets:
            self.metrics.unbanned(kind, len(targets))
        for target in targets:
            self.decider.unban(target)
            self.manual.discard(target)
            self.log_unban(target, reason if isinstance(reason, str) else reason(target))
        self.pending = [b for b in self.pending if b.target not in gone]
        self.announce = [(b, r) for b, r in self.announce if b.target not in gone]
        refused = self._unban_in_kernel(targets)
        if targets:
            self._save("save unban", unbans=targets)
        return refused

    def _lift_allowlisted(self, old: Any) -> list[str]:
        """Lift every active ban on a target the allowlist now holds (a network: one
        holding an allowlisted address).  An admin's own ban (``rblguard ban``, maybe
        ``--force``) is kept unless this reload allowlisted it (``old`` is the
        allowlist before the reload; None at start-up, when nobody knows)."""
        hits = self.allowlist.overlapping(self.decider.active_targets())
        kept = [t for t in hits if t in self.manual
                and (old is None or old.overlapping([t]))]
        lifted = [t for t in hits if t not in set(kept)]
        if kept:
            log.warning("keeping %d admin ban(s) on allowlisted targets: %s; "
                        "`rblguard unban TARGET` lifts one", len(kept),
                        ", ".join(kept[:10]) + (" ..." if len(kept) > 10 else ""))
        if lifted:
            self.forget_bans(lifted, lambda t: f"allowlisted ({self.allowlist.reason(t)})",
                             "allowlisted")
            self.lifted_allowlisted += len(lifted)
            log.info("lifted %d ban(s) on allowlisted targets", len(lifted))
        return lifted

    # -- housekeeping ----------------------------------------------------------------

    def _housekeeping(self) -> None:
        assert self.backend is not None
        now = time.time()
        self.manual.difference_update(self.decider.expire(now))
        health = self.backend.health()
        self.metrics.firewall_health(health.ok)
        if not health.ok:
            log.warning("firewall objects damaged (%s): restoring them with %d bans",
                        "; ".join(health.problems), sum(self.decider.active_counts().values()))
            self.metrics.firewall_error("health")
            try:
                self.backend.ensure()
                for batch in restore_batches(self, now):
                    self._to_kernel(batch)
            except FirewallError as exc:
                log.error("cannot restore firewall objects: %s", exc)
        try:
            self.metrics.set_kernel_counters(self.backend.counters())
        except FirewallError as exc:
            self.metrics.firewall_error("counters")
            self.limited_warning("counters", "cannot read firewall counters: %s", exc)
        self.metrics.set_active(self.decider.active_counts())
        for source, st in self.sources.items():
            self.metrics.source_lag(source, st.follower.lag_bytes())
        if self.state is not None:
            self._state_call("prune", self.state.prune, now, now - self.decider.forget_after)

    # -- reload ----------------------------------------------------------------------

    def _remember_rule_files(self) -> None:
        dirs = [shipped_rules_dir(), *self.config.rules_dirs]
        self.rule_mtimes = {str(p): p.stat().st_mtime for p in rule_files(
            [d for d in dirs if os.path.isdir(d)])}
        tcprules = self.config.tcprules
        self.tcprules_mtime = (os.stat(tcprules).st_mtime
                               if tcprules and os.path.exists(tcprules) else None)

    def _check_reload_triggers(self) -> None:
        old_rules, old_tcp = self.rule_mtimes, self.tcprules_mtime
        try:
            self._remember_rule_files()
        except OSError:
            return
        if self.rule_mtimes != old_rules or self.tcprules_mtime != old_tcp:
            log.info("rule files or tcprules changed: reloading")
            self.reload()

    def _reread_config(self) -> Any:
        """The config file again, with the keys a reload applies taken from it and the
        rest kept as running (ConfigError if the file is bad: nothing changes)."""
        from rblguard.config import load_config

        must_exist = self.config_explicit or self.config.path is not None
        fresh = load_config(self.config_path, must_exist=must_exist)
        keys = {"backend" if k == "firewall" else k for k in fresh.changed(self.config)}
        later = sorted(keys - set(RELOADED_KEYS))
        if later:
            log.warning("%s: %s changed; that takes a restart (a reload applies %s)",
                        self.config_path, ", ".join(later), ", ".join(RELOADED_KEYS))
        return dataclasses.replace(self.config, path=fresh.path or self.config.path,
                                   **{k: getattr(fresh, k) for k in RELOADED_KEYS})

    def reload(self, *, raise_errors: bool = False) -> dict[str, Any]:
        """Re-read the config file's allowlist, tcprules and rule directories, the rules
        and the host's addresses, then lift the bans the new allowlist holds.  A bad
        edit (config or rule) keeps everything as it was and is raised only for
        `rblguard reload`, whose caller shows it; a signal or a file change just logs
        it (file, line, problem)."""
        from rblguard.daemon import sdnotify
        from rblguard.decisions.allowlist import Allowlist

        sdnotify.reloading()
        try:
            config = self._reread_config()
            ruleset = self._load_rules(config)
        except (ConfigError, RuleError) as exc:
            self.metrics.reload(False)
            log.error("reload failed, keeping the config and the %d rules in use: %s",
                      len(self.ruleset.rules), exc)
            sdnotify.ready()
            if raise_errors:
                raise
            return {"rules": len(self.ruleset.rules), "changed": [], "lifted": [],
                    "error": str(exc)}
        old = {r.name for r in self.ruleset.rules}
        self.config = config
        self.ruleset = ruleset
        self.scanner = Scanner(ruleset)
        old_allowlist = self.allowlist
        self.allowlist = Allowlist.from_config(config)
        self.decider.set_allowlist(self.allowlist)
        lifted = self._lift_allowlisted(old_allowlist)
        with contextlib.suppress(OSError):
            self._remember_rule_files()  # the directories and tcprules may be new ones
        self.metrics.reload(True)
        new = {r.name for r in ruleset.rules}
        changed = sorted(old ^ new)
        log.info("reloaded %d rule(s) from %d file(s)%s; allowlist of %d entries",
                 len(ruleset.rules), len(ruleset.files),
                 f"; changed: {', '.join(changed)}" if changed else "", len(self.allowlist))
        sdnotify.ready()
        return {"rules": len(ruleset.rules), "changed": changed, "lifted": lifted}

    # -- control requests (answered on the main loop) --------------------------------

    def _control_request(self, body: dict[str, Any]) -> dict[str, Any]:  # server thread
        from rblguard.daemon.control import ControlError

        request = _Request(body)
        self.wakeups.put(request)
        if not request.done.wait(30):
            raise ControlError("the daemon did not answer within 30 s")
        if request.error is not None:
            raise ControlError(request.error)
        assert request.answer is not None
        return request.answer

    def _answer(self, request: _Request) -> None:
        from rblguard.daemon.handlers import handle

        try:
            request.answer = handle(self, request.body)
        except (ValueError, RuleError, ConfigError, FirewallError) as exc:
            request.error = str(exc)
        except Exception as exc:  # never let a request kill the loop
            log.exception("control request %r failed", request.body)
            request.error = f"internal error: {exc}"
        finally:
            request.done.set()

    # -- logging ---------------------------------------------------------------------

    @staticmethod
    def log_ban(ban: Ban, refreshed: bool) -> None:
        try:
            until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ban.until))
        except (OverflowError, ValueError, OSError):
            until = repr(ban.until)  # never let a log line stop the loop
        log.info("ban %s until %s rule=%s%s reason=%s", ban.target, until,
                 ban.rule, " (refresh)" if refreshed else "", ban.reason)

    @staticmethod
    def log_unban(target: str, reason: str) -> None:
        log.info("unban %s reason=%s", target, reason)

    def limited_warning(self, key: str, message: str, *args: Any) -> None:
        from rblguard.daemon.logs import warn_limited

        warn_limited(log, key, message, *args)


def main(args: argparse.Namespace) -> int:
    from rblguard.config import ConfigError, load_config
    from rblguard.daemon.logs import setup_logging

    explicit = args.config != "/etc/rblguard/rblguard.yaml"
    try:
        config = load_config(args.config, must_exist=explicit)
    except ConfigError as exc:
        print(f"rblguard: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    daemon = Daemon(config, args.config, config_explicit=explicit)
    if args.check:
        try:
            ruleset = daemon._load_rules()
        except RuleError as exc:
            print(f"rblguard: {exc}", file=sys.stderr)
            return 2
        print(f"config {args.config} OK; {len(ruleset.rules)} rule(s) from "
              f"{len(ruleset.files)} file(s)")
        return 0
    from rblguard.daemon.metrics import MetricsAddressError

    try:
        return daemon.run()
    except RuleError as exc:
        log.error("%s", exc)
        return 2
    except FirewallError as exc:
        log.error("firewall: %s", exc)
        return 1
    except (ControlError, MetricsAddressError) as exc:  # socket taken, port taken, ...
        log.error("cannot start: %s", getattr(exc, "strerror", None) or exc)
        return 2
    except OSError as exc:  # a directory or file the daemon needs cannot be made
        where = f" {exc.filename}" if exc.filename else ""
        log.error("cannot start:%s %s", where, exc.strerror or exc)
        return 2
