"""The per-origin rate cap: a member that floods the hub is quarantined, not obeyed.

A compromised or misconfigured host could publish a ban for every address it can
spell.  Its own storm guard (``storm.max_per_second``, 5,000 by default) bounds what a
healthy member publishes, so the cap sits above it: a real 100,000-ban wave at a few
thousand a second reaches every host, a flood of 50,000 a second does not.
"""

from __future__ import annotations

ORIGIN_LIMIT = 1024  # origins whose rate is tracked; more are never a real fleet


class OriginGuard:
    """A token bucket per origin on the entries' server time, and the quarantine.

    The bucket holds one second's worth of the cap, so a clump of bans published in
    one batch (one millisecond of stream ids) passes; an origin over the cap for longer
    is quarantined for ``quarantine`` seconds, and all its entries are refused until
    then.  Driven by stream-id time, a catch-up over old entries counts them at the
    rate they were written, not the rate they are read.
    """

    def __init__(self, rate: float, quarantine: float) -> None:
        self.rate = rate
        self.quarantine_ms = int(quarantine * 1000)
        self._buckets: dict[str, list[float]] = {}  # origin -> [tokens, last ms]
        self.quarantined: dict[str, int] = {}  # origin -> until (server ms)

    def admit(self, origin: str, at_ms: int) -> str | None:
        """None if ``origin``'s entry at ``at_ms`` is obeyed, else the refusal reason;
        "rate" is returned once, for the entry that started the quarantine."""
        until = self.quarantined.get(origin)
        if until is not None:
            if at_ms < until:
                return "quarantined"
            del self.quarantined[origin]
            self._buckets.pop(origin, None)
        bucket = self._buckets.get(origin)
        if bucket is None:
            if len(self._buckets) >= ORIGIN_LIMIT:
                self._buckets.clear()
            bucket = self._buckets[origin] = [self.rate, float(at_ms)]
        elapsed = max(0.0, at_ms - bucket[1]) / 1000.0
        bucket[0] = min(self.rate, bucket[0] + elapsed * self.rate)
        bucket[1] = max(bucket[1], float(at_ms))
        if bucket[0] < 1.0:
            self.quarantined[origin] = at_ms + self.quarantine_ms
            return "rate"
        bucket[0] -= 1.0
        return None

    def is_quarantined(self, origin: str, now_ms: int) -> bool:
        until = self.quarantined.get(origin)
        return until is not None and now_ms < until

    def active(self, now_ms: int) -> dict[str, int]:
        """Origins quarantined at ``now_ms``, with the end of each (server ms).  Any
        thread may ask (``rblguard status``): it reads a copy, taken in one C call."""
        return {o: u for o, u in dict(self.quarantined).items() if now_ms < u}
