"""What the daemon answers on its control socket; runs on the daemon's main loop.

rblguard.daemon.control has already checked each request's shape and normalised its target,
so these handlers only decide.  They run on the thread that owns the state, which is
why a ban from the CLI and a ban from the log can never race.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rblguard import __version__
from rblguard.config import ConfigError
from rblguard.daemon.control import ControlError
from rblguard.daemon.pipeline import log_unban
from rblguard.firewall.base import FirewallError
from rblguard.matching.rules import RuleError

if TYPE_CHECKING:
    from rblguard.daemon.loop import Daemon

log = logging.getLogger("rblguard")

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
        # read to here: the saved position may lag by up to a second (Journal.commit)
        where = d.pipeline.journal.read_to.get(path) or st.position
        sources.append({
            "path": path,
            "file": where.file if where else current,
            "offset": where.offset if where else 0,
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
        "state": d.config.state_dir if d.pipeline.journal.saving else None,
        "allowlist_lifted": d.pipeline.lifted_allowlisted,
    }


def _list(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    journal = d.pipeline.journal
    rows = journal.call("list bans", journal.state.load_bans, now) if journal.saving else None
    details = {b.target: b for b in rows or []}
    bans = []
    for target, until in sorted(d.decider.active_items(), key=lambda tu: tu[1]):
        info = details.get(target)
        bans.append({"target": target, "until": until, "remaining_s": round(until - now, 1),
                     "rule": info.rule if info else None,
                     "reason": info.reason if info else None})
    return {"bans": bans}


def _ban(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    """Ban now; an error (and nothing banned) if the kernel refuses the entry."""
    previous = d.decider.until(body["target"])
    verdict = d.decider.on_manual(body["target"], body.get("duration"),
                                  body.get("reason") or "", bool(body.get("force")),
                                  time.time())
    if verdict.refused:
        d.metrics.refused(verdict.refused)
        raise ValueError(verdict.message or f"refused: {verdict.refused}")
    ban = d.pipeline.ban_now(verdict, previous)
    return {"target": ban.target, "until": ban.until, "refreshed": verdict.refreshed}


def _unban(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    """Free an address or network: lift every active ban that blocks any of it (for an
    IPv6 client its /64, for an IPv4 one its subnet ban too), and say which."""
    target = body["target"]
    lifted = d.decider.overlapping(target)
    # the target itself from the kernel in any case: an element nobody knows of
    refused = d.pipeline.unban(lifted, "manual", kernel_too=[target])
    if not lifted:
        log_unban(target, "manual (no active ban)")
    if refused:
        raise FirewallError("the kernel refused to lift " + "; ".join(
            f"{t}: {why}" for t, why in refused.items()))
    return {"target": target, "removed": bool(lifted), "lifted": lifted}


def _flush(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    return {"removed": d.pipeline.clear()}


def _reload(d: Daemon, _body: dict[str, Any]) -> dict[str, Any]:
    return d.reload(raise_errors=True)


HANDLERS = {"status": _status, "list": _list, "ban": _ban, "unban": _unban,
            "flush": _flush, "reload": _reload}


def handle(d: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    return HANDLERS[body["cmd"]](d, body)


# -- the way there and back: the server thread waits, the main loop answers -----------


@dataclass
class Request:
    """A control request waiting for the main loop's answer."""

    body: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    answer: dict[str, Any] | None = None
    error: str | None = None


def submit(wakeups: queue.SimpleQueue[Any], body: dict[str, Any]) -> dict[str, Any]:
    """On the control server's thread: queue ``body`` for the main loop and wait for
    its answer (ControlError if it gives an error or none within 30 s)."""
    request = Request(body)
    wakeups.put(request)
    if not request.done.wait(30):
        raise ControlError("the daemon did not answer within 30 s")
    if request.error is not None:
        raise ControlError(request.error)
    assert request.answer is not None
    return request.answer


def answer(d: Daemon, request: Request) -> None:
    """On the main loop: answer one request; never let a request kill the loop."""
    try:
        request.answer = handle(d, request.body)
    except (ValueError, RuleError, ConfigError, FirewallError) as exc:
        request.error = str(exc)
    except Exception as exc:
        log.exception("control request %r failed", request.body)
        request.error = f"internal error: {exc}"
    finally:
        request.done.set()
