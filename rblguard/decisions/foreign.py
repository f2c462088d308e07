"""Another fleet member's ban, through this host's own decision stage.

The hub only says what another host decided; this host still has the last word: its
allowlist wins over any member, a ban already in force for longer is kept (two members
that agree never shorten a ban), and the same entry read twice changes nothing.  The
ban made here carries its origin, so the state, ``rblguard list`` and the publisher can
tell it from this host's own (a foreign ban is never published again: no echo).
"""

from __future__ import annotations

from rblguard.decisions.decider import Decider, Verdict
from rblguard.model import Ban


def on_foreign(decider: Decider, target: str, until: float, rule: str, origin: str,
               now: float) -> Verdict:
    """The verdict on ``origin``'s ban of ``target`` until ``until`` (this host's Unix
    time).  ``target`` is canonical and already checked for width and length
    (rblguard.fleet.entries); refusals are ``allowlist`` and ``stale`` verdicts."""
    if until <= now:
        return Verdict(stale=True)
    allowlist = decider.allowlist
    if allowlist.overlaps(target) if "/" in target else allowlist.contains(target):
        return Verdict(refused="allowlist", message=f"{target} (from fleet member "
                       f"{origin}) is allowlisted ({allowlist.reason(target)})")
    current = decider.until(target)
    if current is not None and current >= until:
        return Verdict()  # in force at least as long already: a duplicate or an echo
    decider.restore(target, until)  # sets the ban's end, as for a kernel refusal
    return Verdict(bans=[Ban(target, until, rule, f"fleet ban from {origin}", origin)],
                   refreshed=current is not None)
