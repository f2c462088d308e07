"""``rblguard run``: the loop that joins sources, rules, decisions and the firewall.

One thread, the loop in Daemon.run(), owns every piece of state: followers, the
decider, the pipeline with its journal, and the firewall backend.  It waits in one
poll() for inotify (a source changed: it reads the events itself) and for its inbox
(rblguard.daemon.inbox), through which other threads hand it work: the control socket
passes requests and waits for the answer, signals ask for a reload or a stop.  Bursts
coalesce: however many notifications arrive, each wake-up reads every
changed source to its end once and sends all the bans it found to the kernel in one
batch.  The durability order (kernel, then state) is the pipeline's and its journal's.
"""

from __future__ import annotations

import logging
import select
import signal
import threading
import time
from collections.abc import Container
from operator import attrgetter
from typing import Any

from rblguard import __version__
from rblguard.config import Config
from rblguard.daemon import fleet, handlers, sdnotify, startup
from rblguard.daemon import reload as reloading
from rblguard.daemon.inbox import Inbox
from rblguard.daemon.pipeline import housekeeping
from rblguard.fleet.link import Delivery
from rblguard.logs import warn_limited
from rblguard.sources.stamps import detect_format
from rblguard.store.journal import COMMIT_EVERY

log = logging.getLogger("rblguard")

READ_BYTES = 4 << 20  # per source per wake-up: keeps a backlog from starving the socket
TICK = 1.0  # seconds: safety-net re-read of every source, rule-file and tcprules check
# Bans in the kernel but not yet in the state: saved (with their positions) once every
# source is read to its end, or once this many wait (a long backlog).
SAVE_EVERY = 10_000
SAVE_AFTER = 0.5  # seconds a due commit may wait while more lines keep coming
HOUSEKEEPING = 5.0  # seconds: firewall health (self-repair), counters, expiry
RELOAD = object()  # the queue item SIGHUP sends (a str would be taken for a source)
_DATA = attrgetter("data")  # a chunk's bytes


class Daemon:
    """Everything ``rblguard run`` does, driven by run(); ``config_arg`` is the
    ``--config`` the admin named (None: the default path)."""

    def __init__(self, config: Config, config_arg: str | None = None) -> None:
        self.config = config
        self.config_arg = config_arg
        self.wakeups = Inbox()
        self._poller = select.poll()
        self.stopping = threading.Event()
        self.started = time.time()
        self.dirty: set[str] = set()
        self.deferred: list[Any] = []  # wake-ups taken early by _more_came: for _wait
        self._fds = (-1, -1)  # the inbox's and inotify's descriptors, once run() has them
        self.sources: dict[str, startup.Source] = {}
        self.triggers = reloading.Triggers()
        # The stages, built by start() (rblguard.daemon.startup):
        self.ruleset: Any = None
        self.scanner: Any = None
        self.allowlist: Any = None
        self.decider: Any = None
        self.pipeline: Any = None  # rblguard.daemon.pipeline.Pipeline
        self.backend: Any = None
        self.metrics: Any = None
        self.watcher: Any = None
        self.fleet: Any = None  # rblguard.fleet.link.Link, when the config has a fleet

    def start(self, serve_metrics: bool = False) -> None:
        """Everything before the loop (see rblguard.daemon.startup)."""
        startup.start(self, serve_metrics)

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        from rblguard.daemon.control import ControlServer
        from rblguard.sources.watch import SourceWatcher

        # The socket first: a second rblguard on the same socket stops here, before it
        # touches the firewall or the state of the one already running.  Requests wait
        # in the queue until the loop below answers them.
        self.control = ControlServer(self.config.control_socket,
                                     lambda body: handlers.submit(self.wakeups, body))
        self.control.start()
        ready = False
        try:
            self.start(serve_metrics=True)
            fleet.start_link(self)
            self.watcher = SourceWatcher(list(self.sources), self.wakeups.put)
            self.watcher.start(own_thread=False)  # the loop polls its descriptor
            self._fds = (self.wakeups.fileno(), self.watcher.fileno())  # (inbox, inotify)
            self._poller.register(self._fds[0], select.POLLIN)
            if self._fds[1] >= 0:
                self._poller.register(self._fds[1], select.POLLIN)
            self._install_signals()
            self._pump()  # the backlog up to now, before we call ourselves ready
            self.pipeline.timing = True  # from now on each ban's latency is measured
            sdnotify.ready()
            ready = True
            sdnotify.status(f"following {len(self.sources)} source(s)")
            log.info("rblguard %s ready: %d source(s), %d rule(s), backend %s", __version__,
                     len(self.sources), len(self.ruleset.rules), self.backend.name)
            self._loop()
        finally:
            self._stop(ready)
        return 0

    def _loop(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        house_every = min(HOUSEKEEPING, watchdog / 2) if watchdog else HOUSEKEEPING
        next_tick = next_house = time.monotonic()
        while not self.stopping.is_set():
            self._wait(max(0.0, min(next_tick, next_house) - time.monotonic()))
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                self.dirty.update(self.sources)
                if self.triggers.changed(self.config):
                    log.info("rule files or tcprules changed: reloading")
                    self.reload()
            self._pump()
            if now >= next_house:
                next_house = now + house_every
                self._housekeeping()
                sdnotify.watchdog()

    def _stop(self, ready: bool) -> None:
        sdnotify.stopping()
        if ready:
            self._commit(force=True)  # the positions read since the last save
        if self.watcher is not None:
            self.watcher.stop()
        if self.fleet is not None:
            self.fleet.stop()
        self.control.stop()
        self.wakeups.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.backend is not None:
            self.backend.close()
        if ready:
            log.info("rblguard stopped; bans stay in the kernel until they expire")

    def _wait(self, timeout: float) -> None:
        """Block for the first wake-up (a source changed, a request, a signal), then
        take every other one already there."""
        items, self.deferred = self.deferred, []
        readable = None  # not polled: look at both
        if not items:  # {fd: event}, made in C: a wake-up's Python steps are its cost
            readable = dict(self._poller.poll(timeout * 1000))
        items += self._arrived(readable)
        for item in items:
            if item is RELOAD:
                self.reload()
            elif isinstance(item, str):
                self.dirty.add(item)
            elif isinstance(item, handlers.Request):
                handlers.answer(self, item)
            elif isinstance(item, Delivery):
                fleet.apply(self, item)

    def _arrived(self, readable: Container[int] | None = None) -> list[Any]:
        """What the inbox holds, and the sources inotify says changed (never blocks);
        only from the descriptors in ``readable`` when a poll() said which."""
        items = []
        if readable is None or self._fds[0] in readable:
            items = self.wakeups.take()
        if self.watcher is not None and (readable is None or self._fds[1] in readable):
            self.dirty |= self.watcher.changed()
        return items

    def _install_signals(self) -> None:
        def stop(_sig: int, _frame: Any) -> None:
            self.stopping.set()
            self.wakeups.put(None)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda _s, _f: self.wakeups.put(RELOAD))

    # -- sources -> rules -> pipeline ------------------------------------------------

    def _pump(self) -> None:
        """Read every dirty source to its end, ban what it holds, then save positions."""
        read_sources: set[str] = set()  # sources that gave lines in this round
        while self.dirty:
            source = self.dirty.pop()
            st = self.sources.get(source)  # a stray wake-up must never stop the loop
            if st is not None and self._read(source, st):
                read_sources.add(source)
            if not self.dirty:
                self._more_came(read_sources)  # may make sources dirty again
        self._commit()

    def _read(self, source: str, st: startup.Source) -> bool:
        """Read one source to its end (READ_BYTES at a time); whether it gave lines.

        Each wake-up of a front end's log comes here for a line or two, after a sleep
        that left the CPU's caches cold: every Python step counts several times over
        (docs/benchmarks.md), so what is not needed is not called."""
        read = False
        while True:
            try:
                chunks = st.follower.read(READ_BYTES)
            except OSError as exc:
                warn_limited(log, f"read {source}", "cannot read %s: %s", source, exc)
                break
            for chunk in chunks:
                self._scan(source, st, chunk)
            if chunks:
                self.pipeline.read(chunks[-1].position(source))
                read = True
            if self.pipeline.pending:  # most wake-ups bring none
                self.pipeline.flush(save=False)
                if self.pipeline.journal.unsaved >= SAVE_EVERY:  # only a flush adds some
                    self._commit(force=True)
            if sum(map(len, map(_DATA, chunks))) < READ_BYTES or self.stopping.is_set():
                break  # read to the end (or asked to stop)
        return read

    def _scan(self, source: str, st: startup.Source, chunk: Any) -> None:
        key = (chunk.dev, chunk.inode)
        fmt = st.formats.get(key)
        if fmt is None:
            fmt = st.formats[key] = detect_format(chunk.data)
            if len(st.formats) > 64:
                st.formats.pop(next(iter(st.formats)))
        now = time.time()
        result = self.scanner.scan(chunk.data, chunk.start, fmt, now, times=False)
        self.metrics.observe_chunk(source, result)
        if result.lines:
            st.last_chunk = (chunk.data, fmt, now)
        if result.events:
            self.pipeline.decide(source, result, self._policy, time.time())

    def _policy(self, rule: str) -> Any:
        return self.ruleset.by_name(rule).policy

    def _more_came(self, read_sources: set[str]) -> bool:
        """Before a due commit and its journal lines: did more lines come while we read?
        A burst often arrives in pieces (multilog writes as it reads), and the commit of
        one piece must not hold up the bans of the next.  Source wake-ups queued
        meanwhile are taken, and the sources just read are read once more; anything
        else queued (a control request, a signal) waits for the main loop.  A commit
        waits at most SAVE_AFTER past its due time."""
        journal, now = self.pipeline.journal, time.monotonic()
        if (not read_sources or not journal.due(now)
                or now - journal.last_commit >= COMMIT_EVERY + SAVE_AFTER):
            return False  # no commit to hold up now, or held up long enough
        for item in self._arrived():
            (self.dirty.add if isinstance(item, str) else self.deferred.append)(item)
        self.dirty |= read_sources
        read_sources.clear()
        return True

    def _commit(self, force: bool = False) -> None:
        pipeline = self.pipeline
        if not (force or pipeline.announce or pipeline.journal.due()):
            return  # nothing to log, nor to save yet: the usual wake-up
        for position in pipeline.commit(force):
            self.sources[position.source].position = position

    def _housekeeping(self) -> None:
        now = time.time()
        housekeeping(self.pipeline, now)
        for source, st in self.sources.items():
            self.metrics.source_lag(source, st.follower.lag_bytes())
        self.prune(now)

    def prune(self, now: float) -> None:
        """Expired bans and forgotten offenders out of the state, so it stays bounded."""
        state = self.pipeline.journal.state
        if state is not None:
            self.pipeline.journal.call("prune", state.prune, now,
                                       now - self.decider.forget_after)

    # -- reload ----------------------------------------------------------------------

    def reload(self, *, raise_errors: bool = False) -> dict[str, Any]:
        """Re-read what a reload applies (see rblguard.daemon.reload.apply)."""
        return reloading.apply(self, raise_errors=raise_errors)
