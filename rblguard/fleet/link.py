"""The link to the hub: two threads, each owning its Redis connection.

The daemon loop never waits on Redis.  It hands this host's bans to ``publish``, which
only appends to a bounded queue; the publisher thread sends each batch in one pipeline.
The reader thread blocks in XREAD, checks every entry (rblguard.fleet.entries, the
origin guard) and hands what passes to the daemon's queue as a Delivery, plain data:
the loop applies it through its own decision stage, on the thread that owns the state.

Redis down: the queue keeps the newest ``queue_max`` bans (the oldest are dropped and
counted), both threads retry with jittered exponential back-off, and the reader picks up
where it stopped, or from the snapshot if Redis lost the entries it needs.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rblguard.fleet.entries import ForeignBan, Refusal, parse_entry, parse_id
from rblguard.fleet.entries import parse_snapshot_member as parse_member
from rblguard.fleet.guard import OriginGuard
from rblguard.fleet.hub import Hub, connect
from rblguard.fleet.metrics import FleetMetrics
from rblguard.fleet.settings import FleetSettings
from rblguard.logs import warn_limited
from rblguard.model import Ban

log = logging.getLogger("rblguard.fleet")

BLOCK_MS = 1000  # one XREAD's wait: how soon a stop is seen
READ_COUNT = 10_000  # entries per XREAD: a 100,000-ban wave comes in ten reads
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0  # seconds, doubled per failure, jittered
PUBLISH_MAX = 10_000  # bans per pipeline: a queue that waited for the hub goes in parts
CLOCK_EVERY = 300.0  # seconds between measures of the hub's clock (a stepped local clock)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Checked foreign bans for the daemon loop, and the stream id read up to.

    ``offset_ms`` is the hub's clock minus this host's: a ban ends at
    (expires_ms - offset_ms) / 1000 on this host's clock, however wrong that clock is.
    ``cursor`` is None for a part of a resynchronisation from the snapshot."""

    bans: list[ForeignBan]
    cursor: str | None
    offset_ms: int
    resync: bool = False
    lost: bool = False  # the hub lost its data: publish this host's own bans again


@dataclass
class LinkStatus:
    """What ``rblguard status`` shows of the link (read from any thread)."""

    state: str = "connecting"  # connecting | up | down
    hub: str = ""
    last_error: str | None = None
    lag_s: float | None = None  # hub time of the newest entry read to when it was read
    cursor: str | None = None
    published: int = 0
    applied: int = 0  # other members' bans put in the kernel (by the daemon loop)
    dropped: int = 0
    resyncs: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubled each time, with
    jitter so that 50 hosts that lost the hub together do not return together."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(failures, 10)) * random.uniform(0.5, 1)


class Link:
    """The publisher and reader threads for one ``fleet:`` block.

    ``cursor`` is the last stream id applied (from the state; None: never);
    ``deliver`` puts a Delivery on the daemon's queue."""

    def __init__(self, settings: FleetSettings, cursor: str | None,
                 deliver: Callable[[Delivery], None], metrics: FleetMetrics) -> None:
        self.settings = settings
        self.cursor = cursor
        self.deliver = deliver
        self.metrics = metrics
        self.status = LinkStatus(hub=settings.hub, cursor=cursor)
        self.guard = OriginGuard(settings.origin_max_per_second, settings.quarantine)
        self.stopping = threading.Event()
        self.outbox: collections.deque[list[Ban]] = collections.deque()
        self.queued = 0
        self.wake = threading.Condition()
        self.up = {"reader": False, "publisher": False}
        self.threads = [threading.Thread(target=self._run, args=(name, job),
                                         name=f"fleet-{name}", daemon=True)
                        for name, job in (("reader", self._read_loop),
                                          ("publisher", self._publish_loop))]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.wake:
            self.wake.notify_all()
        for thread in self.threads:
            thread.join(timeout=BLOCK_MS / 1000 + self.settings.timeout + 1)

    # -- the daemon loop's side: never blocks -------------------------------------------

    def publish(self, bans: list[Ban]) -> None:
        """Queue this host's bans (from its own log) for the hub."""
        if not bans:
            return
        with self.wake:
            self.outbox.append(bans)
            self.queued += len(bans)
            while self.queued > self.settings.queue_max and self.outbox:
                lost = self.outbox.popleft()
                self.queued -= len(lost)
                self.status.dropped += len(lost)
                self.metrics.dropped.inc(len(lost))
            self.metrics.queue.set(self.queued)
            self.wake.notify()

    # -- the threads --------------------------------------------------------------------

    def _run(self, name: str, job: Callable[[Hub], None]) -> None:
        """Connect, run ``job`` until it raises, back off, again; until stopped."""
        failures = 0
        while not self.stopping.is_set():
            client = None
            try:
                read_timeout = self.settings.timeout + (BLOCK_MS / 1000 if name == "reader"
                                                        else 0)
                client = connect(self.settings, read_timeout)
                hub = Hub(client, self.settings)
                hub.offset_ms = hub.clock_offset()
                self._set_up(name, True)
                failures = 0
                job(hub)
            except Exception as exc:  # redis.RedisError, OSError, a bad reply: retried
                failures += 1
                self._set_up(name, False)
                self._failed(name, exc, failures)
                self.stopping.wait(backoff(failures))
            finally:
                self._set_up(name, False)
                if client is not None:
                    client.close()

    def _set_up(self, name: str, up: bool) -> None:
        self.up[name] = up
        both = all(self.up.values())
        self.metrics.up.set(1 if both else 0)
        if both:
            self.status.state, self.status.last_error = "up", None
        elif self.status.state == "up":
            self.status.state = "down"

    def _failed(self, name: str, exc: Exception, failures: int) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.status.state, self.status.last_error = "down", text
        level = logging.WARNING if failures == 1 else logging.DEBUG
        log.log(level, "fleet hub %s: %s lost it: %s (local banning goes on; retrying)",
                self.settings.hub, name, text)

    def _publish_loop(self, hub: Hub) -> None:
        while not self.stopping.is_set():
            batch = self._take_batch()
            if not batch:
                return
            now = time.time()
            entries = [(b.target, int(b.until - now), b.rule)
                       for bans in batch for b in bans if b.until - now >= 1]
            try:
                if entries:
                    hub.publish(entries, hub.offset_ms)
            except BaseException:
                with self.wake:  # back to the front of the queue, for the next connection
                    self.outbox.extendleft(reversed(batch))
                raise
            with self.wake:
                self.queued -= sum(map(len, batch))
                self.metrics.queue.set(self.queued)
            self.status.published += len(entries)
            self.metrics.published.inc(len(entries))

    def _take_batch(self) -> list[list[Ban]]:
        """The batches waiting, up to PUBLISH_MAX bans (one pipeline), once there are
        any; [] when stopping.  They count as queued until the hub took them."""
        with self.wake:
            while not self.outbox and not self.stopping.is_set():
                self.wake.wait()
            batch, size = [], 0
            while self.outbox and (not batch or size + len(self.outbox[0]) <= PUBLISH_MAX):
                batch.append(self.outbox.popleft())
                size += len(batch[-1])
            return batch

    def _read_loop(self, hub: Hub) -> None:
        newest = hub.last_id()
        lost = self.cursor not in (None, "0-0") and not hub.holds(str(self.cursor))
        if self.cursor is None or lost:
            self._resync(hub, newest, lost)  # new here, or Redis lost what we read
        measured = time.monotonic()
        while not self.stopping.is_set():
            assert self.cursor is not None
            entries = hub.read(self.cursor, BLOCK_MS, READ_COUNT)
            if entries:
                self._take(hub, entries)
            if time.monotonic() - measured >= CLOCK_EVERY:
                hub.offset_ms, measured = hub.clock_offset(), time.monotonic()

    def _resync(self, hub: Hub, newest: str | None, lost: bool) -> None:
        """Every active ban from the snapshot, then the stream from ``newest`` on
        (entries written meanwhile come twice; applying one twice changes nothing).
        ``lost``: the hub lost the entries this host had read, so the daemon
        publishes its own active bans again (Delivery.lost) for the others."""
        self.status.resyncs += 1
        self.metrics.resyncs.inc()
        now_ms = int(time.time() * 1000) + hub.offset_ms
        count = 0
        for chunk in hub.active(now_ms):
            bans = []
            for member, score in chunk:
                got = parse_member(member, score, now_ms, self.settings)
                if isinstance(got, ForeignBan) and self._admit(got, now_ms, snapshot=True):
                    bans.append(got)
                elif isinstance(got, Refusal):
                    self._refuse(got)
            count += len(bans)
            self.deliver(Delivery(bans, None, hub.offset_ms, resync=True))
        self.cursor = newest or "0-0"
        self.deliver(Delivery([], self.cursor, hub.offset_ms, resync=True, lost=lost))
        if lost:
            log.warning("fleet: the hub %s no longer holds the entries read up to here "
                        "(its data was lost?): resynchronised, and this host's own "
                        "bans are published again", self.settings.hub)
        log.info("fleet: %d active ban(s) from the hub's snapshot; reading on from %s",
                 count, self.cursor)

    def _take(self, hub: Hub, entries: list[tuple[bytes, dict]]) -> None:
        bans = []
        for entry_id, fields in entries:
            ms = (parse_id(entry_id) or (0, 0))[0]
            got = parse_entry(fields, ms, self.settings)
            if isinstance(got, ForeignBan):
                if self._admit(got, ms):
                    bans.append(got)
            elif got is not None:
                self._refuse(got)
        self.cursor = self.status.cursor = entries[-1][0].decode()
        last_ms = (parse_id(entries[-1][0]) or (0, 0))[0]
        self.status.lag_s = max(0.0, (time.time() * 1000 + hub.offset_ms - last_ms) / 1000)
        self.deliver(Delivery(bans, self.cursor, hub.offset_ms))

    def _admit(self, ban: ForeignBan, at_ms: int, snapshot: bool = False) -> bool:
        """The origin guard's word on an entry written at ``at_ms`` (hub time).  A
        snapshot row is only checked for a quarantine: a resync is many bans at
        once, not a flood."""
        if snapshot:
            reason = "quarantined" if self.guard.is_quarantined(ban.origin, at_ms) else None
        else:
            reason = self.guard.admit(ban.origin, at_ms)
        if reason is None:
            return True
        if reason == "rate":
            log.error("fleet: member %s published more than %g bans a second: its "
                      "entries are refused for %g s (a compromised or misconfigured "
                      "host?)", ban.origin, self.settings.origin_max_per_second,
                      self.settings.quarantine)
        self._refuse(Refusal(reason, ban.origin))
        self.metrics.quarantined.set(len(self.guard.active(at_ms)))
        return False

    def refuse_allowlisted(self, origin: str, target: str) -> None:
        """The daemon's allowlist refused ``origin``'s ban of ``target``."""
        self._refuse(Refusal("allowlist", origin, f"{target} is allowlisted here"))

    def _refuse(self, refusal: Refusal) -> None:
        self.metrics.refused.labels(refusal.reason).inc()
        self.status.refused[refusal.reason] = self.status.refused.get(refusal.reason, 0) + 1
        if refusal.reason not in ("rate", "quarantined"):
            warn_limited(log, f"fleet {refusal.reason}", "fleet: refused an entry from "
                         "%s (%s): %s", refusal.origin or "?", refusal.reason,
                         refusal.detail)


def status_of(link: Link | None) -> dict[str, Any] | None:
    """The link as ``rblguard status --json`` shows it (None: no fleet)."""
    if link is None:
        return None
    s = link.status
    return {"state": s.state, "hub": s.hub, "name": link.settings.name,
            "lag_s": None if s.lag_s is None else round(s.lag_s, 3),
            "last_error": s.last_error, "queue": link.queued, "dropped": s.dropped,
            "published": s.published, "applied": s.applied, "resyncs": s.resyncs,
            "refused": dict(s.refused),
            "quarantined": sorted(link.guard.active(int(time.time() * 1000))),
            "cursor": s.cursor}
