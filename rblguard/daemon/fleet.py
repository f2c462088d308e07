"""The fleet inside the daemon: the link started, own bans out, the others' bans in.

Everything here runs on the daemon loop's thread, the one that owns the decider, the
pipeline and the state; the link's threads only ever reach it through the loop's queue
(a Delivery).  Own bans leave through the pipeline's ``publish`` hook, which only the
bans decided from this host's log pass through: a foreign ban is applied through
Pipeline.ban and never published again (no echo).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from rblguard.decisions.foreign import on_foreign
from rblguard.fleet.link import Delivery, Link
from rblguard.fleet.metrics import FleetMetrics

if TYPE_CHECKING:
    from rblguard.daemon.loop import Daemon

log = logging.getLogger("rblguard")

REPUBLISH_BATCH = 10_000  # bans per pipeline when the hub lost its data


def start_link(d: Daemon) -> None:
    """Connect this daemon to its fleet, if the config names one.  Never waits for the
    hub: the link's threads connect (and reconnect) on their own."""
    settings = d.config.fleet
    if settings is None:
        return
    journal = d.pipeline.journal
    stream = f"{settings.prefix}bans"
    cursor = (journal.call("read the fleet position", journal.state.fleet_cursor, stream)
              if journal.saving else None)
    d.fleet = Link(settings, cursor, d.wakeups.put, FleetMetrics(d.metrics.registry))
    d.pipeline.publish = d.fleet.publish
    d.fleet.start()
    log.info("fleet: member %s of the fleet at %s, reading from %s", settings.name,
             settings.hub, cursor or "the snapshot")


def apply(d: Daemon, delivery: Delivery) -> None:
    """Other members' bans into the kernel in one batch, and the stream position
    saved with them (Journal.commit)."""
    link, pipe = d.fleet, d.pipeline
    if link is None:
        return
    now = time.time()
    made = []
    for ban in delivery.bans:
        until = (ban.expires_ms - delivery.offset_ms) / 1000
        verdict = on_foreign(d.decider, ban.target, until, ban.rule, ban.origin, now)
        if verdict.refused:
            link.refuse_allowlisted(ban.origin, ban.target)
        elif verdict.bans:
            pipe.ban(verdict.bans, verdict.refreshed, quiet=True)
            made.append(ban)
    resyncing = delivery.resync and delivery.cursor is None  # more parts to come
    if pipe.pending and not resyncing:  # a resync's parts go to the kernel in one batch
        pipe.flush(save=False)
    link.metrics.applied.inc(len(made))
    link.status.applied += len(made)
    if made:
        shown = ", ".join(b.target for b in made[:5]) + (" ..." if len(made) > 5 else "")
        log.info("fleet: %d ban(s) from %s: %s", len(made),
                 ", ".join(sorted({b.origin for b in made})), shown)
    if not delivery.resync:
        here_ms = time.time() * 1000 + delivery.offset_ms
        for ban in made:
            link.metrics.propagation.observe(max(0.0, here_ms - ban.written_ms) / 1000)
    if delivery.cursor is not None:
        pipe.journal.fleet_cursor = (f"{link.settings.prefix}bans", delivery.cursor)
    if delivery.lost:
        republish(d, now)


def republish(d: Daemon, now: float) -> None:
    """This host's own active bans from its log (not an admin's, not the fleet's) to
    the hub again, after the hub lost its data: the others learn them once more."""
    journal = d.pipeline.journal
    if not journal.saving or d.fleet is None:
        return
    saved = journal.call("read bans to publish again", journal.state.load_bans, now) or []
    own = [b for b in saved if b.origin is None and b.rule != "manual"]
    for start in range(0, len(own), REPUBLISH_BATCH):
        d.fleet.publish(own[start:start + REPUBLISH_BATCH])
    log.info("fleet: published %d own active ban(s) again", len(own))
