"""What the daemon answers on its control socket; runs on the daemon's main loop.

rblguard.daemon.control has already checked each request's shape and normalised its target,
so these handlers only decide.  They run on the thread that owns the state, which is
why a ban from the CLI and a ban from the log can never race.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from rblguard import __version__
from rblguard.addresses import family
from rblguard.firewall.base import Entry, FirewallError

if TYPE_CHECKING:
    from rblguard.daemon.loop import Daemon

FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}


def _status(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    assert d.backend is not None
    health = d.backend.health()
    counters = d.backend.counters()
    sources = []
    for path, st in d.sources.items():
        follower = st.follower
        current = getattr(follower, "current_file", None)
        size = None
        if current and os.path.exists(current):
            size = os.stat(current).st_size
        sources.append({
            "path": path,
            "file": st.position.file if st.position else current,
            "offset": st.position.offset if st.position else 0,
            "size": size,
            "lag_bytes": follower.lag_bytes(),
            "last_time": st.last_time,
        })
    matches = d.metrics.matches_by_rule() if hasattr(d.metrics, "matches_by_rule") else {}
    return {
        "version": __version__,
        "uptime_s": round(time.time() - d.started, 1),
        "backend": {"name": d.backend.name, "healthy": health.ok,
                    "problems": health.problems},
        "sources": sources,
        "rules": [{"name": r.name, "file": r.file, "matches": matches.get(r.name, 0)}
                  for r in d.ruleset.rules],
        "active_bans": {FAMILY_NAMES[f]: n for f, n in d.decider.active_counts().items()},
        "counters": {FAMILY_NAMES[f]: {"packets": c.packets, "connections": c.connections}
                     for f, c in counters.items()},
        "dnsbl": d.metrics.budget(),
        "state": d.config.state_dir if d.state is not None else None,
        "allowlist_lifted": d.lifted_allowlisted,
    }


def _list(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    details = {}
    if d.state is not None:
        rows = d._state_call("list bans", d.state.load_bans, now) or []
        details = {b.target: b for b in rows}
    bans = []
    for target, until in sorted(d.decider.active_items(), key=lambda tu: tu[1]):
        info = details.get(target)
        bans.append({"target": target, "until": until, "remaining_s": round(until - now, 1),
                     "rule": info.rule if info else None,
                     "reason": info.reason if info else None})
    return {"bans": bans}


def _ban(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    """Ban now; an error (and nothing banned) if the kernel refuses the entry."""
    now = time.time()
    previous = d.decider.until(body["target"])
    verdict = d.decider.on_manual(body["target"], body.get("duration"),
                                  body.get("reason") or "", bool(body.get("force")), now)
    if verdict.refused:
        d.metrics.refused(verdict.refused)
        raise ValueError(verdict.message or f"refused: {verdict.refused}")
    ban = verdict.bans[0]
    d.pending.extend(verdict.bans)
    failed = d._flush_bans()
    if failed is None or ban.target in failed:
        # Not in the kernel: take it back out of memory (and out of the retry queue),
        # so that list, status and the state never show a ban that is not there.
        d.pending = [b for b in d.pending if b is not ban]
        d.decider.restore(ban.target, previous)
        why = "it refused the whole batch" if failed is None else failed[ban.target]
        outcome = ("nothing was banned" if previous is None
                   else "the ban already in force is unchanged")
        raise FirewallError(f"the kernel did not take the ban of {ban.target}: {why}; "
                            f"{outcome}")
    d.metrics.ban(ban.rule, family(ban.target))
    d.log_ban(ban, verdict.refreshed)
    return {"target": ban.target, "until": ban.until, "refreshed": verdict.refreshed}


def _unban(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    """Free an address or network: lift every active ban that blocks any of it (for an
    IPv6 client its /64, for an IPv4 one its subnet ban too), and say which."""
    assert d.backend is not None
    target = body["target"]
    lifted = d.decider.overlapping(target)
    kernel = list(dict.fromkeys([*lifted, target]))  # the target itself in any case
    refused = d.forget_bans(lifted, "manual")
    others = [t for t in kernel if t not in lifted]
    refused.update(d._unban_in_kernel(others))
    if others:
        d._save("save unban", unbans=others)
    if not lifted:
        d.log_unban(target, "manual (no active ban)")
    if refused:
        raise FirewallError("the kernel refused to lift " + "; ".join(
            f"{t}: {why}" for t, why in refused.items()))
    return {"target": target, "removed": bool(lifted), "lifted": lifted}


def _flush(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    from rblguard.store.state import StateError

    assert d.backend is not None
    targets = d.decider.active_targets()
    removed = len(targets)
    d.decider.flush()
    d.pending, d.announce = [], []
    d.manual.clear()
    d.backend.flush()
    if d.state is not None:
        try:
            d.state.flush()  # one DELETE, however many bans
            d.unsaved_bans, d.unsaved_unbans = {}, set()
        except StateError as exc:  # held back like any failed save, or a restart
            d.unsaved_bans = {}    # would restore the flushed bans
            d.unsaved_unbans |= set(targets)
            d.limited_warning("state", "cannot save the flush: %s (kernel bans are "
                              "flushed; it is saved once the state works again)", exc)
    d.metrics.unbanned("flush", removed)
    d.log_unban("*", f"flush of {removed} bans")
    return {"removed": removed}


def _reload(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    return d.reload(raise_errors=True)


HANDLERS = {"status": _status, "list": _list, "ban": _ban, "unban": _unban,
            "flush": _flush, "reload": _reload}


def handle(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    return HANDLERS[body["cmd"]](d, body)


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


def restore_batches(d: Daemon, now: float, size: int = 50_000) -> Iterator[list[Entry]]:
    """Every active ban as kernel entries with their remaining time, ``size`` at a
    time: a restart with a million bans never builds all million entries at once."""
    batch: list[Entry] = []
    for target in d.decider.active_targets():
        until = d.decider.until(target)
        # not a refresh: an element the kernel kept holds this time already
        entry = kernel_entry(target, until, now, False) if until is not None else None
        if entry is not None:
            batch.append(entry)
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch
