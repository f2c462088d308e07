"""Everything the daemon does before its loop, in the order that keeps bans safe.

Metrics port first (a taken port stops start-up before the firewall or the state is
touched), then rules, decider and state, then the firewall objects, then every saved
ban back into the kernel, and only then the followers, from their saved positions.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rblguard.daemon import reload as reloading
from rblguard.daemon.pipeline import Pipeline, lift_allowlisted
from rblguard.matching.scanner import Scanner
from rblguard.model import SourcePosition
from rblguard.sources.stamps import StampFormat, span_times
from rblguard.store.journal import Journal
from rblguard.store.state import State, StateError

if TYPE_CHECKING:
    from rblguard.daemon.loop import Daemon

log = logging.getLogger("rblguard")


@dataclass
class Source:
    """One followed log: its follower, the stamp format of each file, where it stands."""

    follower: Any  # rblguard.sources.follow.Follower
    formats: dict[tuple[int, int], StampFormat] = field(default_factory=dict)
    # The last chunk read (its lines, their format, the file's time for stamps without
    # a year): its last line's time is read when status asks, not on every read.
    last_chunk: tuple[bytes, StampFormat, float] | None = None
    position: SourcePosition | None = None

    @property
    def last_time(self) -> float | None:
        """The time of the last line read (None: none read, or it has no stamp)."""
        if self.last_chunk is None:
            return None
        data, fmt, ref = self.last_chunk
        return span_times(data, 0, len(data), fmt, ref)[1]


def start(d: Daemon, serve_metrics: bool) -> None:
    """Build ``d``'s stages; ``serve_metrics`` opens the metrics port first of all."""
    from rblguard.daemon.metrics import Metrics
    from rblguard.decisions.allowlist import Allowlist
    from rblguard.decisions.decider import Decider, DecisionSettings
    from rblguard.firewall import make_backend
    from rblguard.sources.follow import Follower

    cfg = d.config
    d.ruleset = reloading.ruleset_of(cfg)
    d.scanner = Scanner(d.ruleset, connection_events=False)
    d.metrics = Metrics(zones=cfg.dnsbl.zones,
                        connections_per_day=cfg.dnsbl.connections_per_day,
                        queries_per_day=cfg.dnsbl.queries_per_day)
    d.metrics.reload(True)
    if serve_metrics and cfg.metrics:
        d.metrics.serve(cfg.metrics)
    d.allowlist = Allowlist.from_config(cfg)
    d.decider = Decider(DecisionSettings.from_config(cfg), d.allowlist)
    d.metrics.watch_active(lambda: d.decider.active_counts())
    journal = Journal(open_state(cfg.state_dir),
                      lambda t: d.decider.until(t) is not None, d.decider.history_updates)
    d.backend = make_backend(cfg.backend)
    d.backend.ensure()
    d.pipeline = Pipeline(d.decider, d.backend, journal, d.metrics)
    with _no_collector():
        positions = restore(d)
    d.sources = {src: Source(Follower(src, positions.get(src)), position=positions.get(src))
                 for src in cfg.source_paths}
    for src in d.sources:
        if not os.path.exists(src):
            log.warning("source %s does not exist (yet): it is followed from its first "
                        "line as soon as it appears; check the path if it never does", src)
    d.dirty.update(d.sources)
    d.triggers.remember(cfg)


@contextlib.contextmanager
def _no_collector() -> Iterator[None]:
    """No cyclic garbage collection while the saved bans are loaded.  100,000 bans make
    hundreds of thousands of objects that all live on (or die by reference count), and
    each collection started among them would walk every one made so far: a third of
    the time to READY.  The collector runs again, as before, once they are in."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def open_state(state_dir: str) -> State | None:
    """The state database, or None (and an error logged): bans then stay in the
    kernel but do not survive a restart."""
    try:
        return State(state_dir)
    except StateError as exc:
        log.error("%s; running without saved state: bans stay in the kernel but "
                  "will not survive a restart", exc)
        return None


def restore(d: Daemon) -> dict[str, SourcePosition]:
    """The saved bans into the decider and the kernel; the saved source positions."""
    journal = d.pipeline.journal
    if journal.state is None:
        return {}
    now = time.time()
    d.prune(now)
    d.pipeline.load(now)
    positions = journal.call("load positions", journal.state.load_positions) or {}
    lift_allowlisted(d.pipeline, d.allowlist, None)  # it may have grown while we were down
    t0 = time.monotonic()
    restored = d.pipeline.restore(now)
    log.info("restored %d bans into the kernel in %.3f s", restored, time.monotonic() - t0)
    return positions
