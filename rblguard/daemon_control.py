"""What the daemon answers on its control socket; runs on the daemon's main loop.

rblguard.control has already checked each request's shape and normalised its target,
so these handlers only decide.  They run on the thread that owns the state, which is
why a ban from the CLI and a ban from the log can never race.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from rblguard import __version__
from rblguard.addresses import family
from rblguard.firewall.base import Entry

if TYPE_CHECKING:
    from rblguard.daemon import Daemon

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
    now = time.time()
    verdict = d.decider.on_manual(body["target"], body.get("duration"),
                                  body.get("reason") or "", bool(body.get("force")), now)
    if verdict.refused:
        d.metrics.refused(verdict.refused)
        raise ValueError(verdict.message or f"refused: {verdict.refused}")
    for ban in verdict.bans:
        d.pending.append(ban)
        d.metrics.ban(ban.rule, family(ban.target))
    d._flush_bans()
    ban = verdict.bans[0]
    d.log_ban(ban, verdict.refreshed)
    return {"target": ban.target, "until": ban.until, "refreshed": verdict.refreshed}


def _unban(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    assert d.backend is not None
    target = body["target"]
    removed = d.decider.unban(target)
    d.backend.unban([target])
    if d.state is not None:
        d._state_call("save unban", d.state.commit, unbans=[target])
    d.log_unban(target, "manual")
    return {"target": target, "removed": removed}


def _flush(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    assert d.backend is not None
    removed = sum(d.decider.active_counts().values())
    d.decider.flush()
    d.backend.flush()
    if d.state is not None:
        d._state_call("flush", d.state.flush)
    d.log_unban("*", f"flush of {removed} bans")
    return {"removed": removed}


def _reload(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    return d.reload(raise_errors=True)


HANDLERS = {"status": _status, "list": _list, "ban": _ban, "unban": _unban,
            "flush": _flush, "reload": _reload}


def handle(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    return HANDLERS[body["cmd"]](d, body)


def restore_entries(d: Daemon, now: float) -> list[Entry]:
    """Every active ban as a kernel entry with its remaining time."""
    return [Entry(t, max(1, int(u - now))) for t, u in d.decider.active_items()]
