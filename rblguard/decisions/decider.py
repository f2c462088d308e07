"""From a rule's match to a ban: allowlist, thresholds, repeat offenders, prefixes, storms.

The Decider belongs to the daemon's main thread, which is why it has no lock.  It keeps
only what each decision needs, compactly: the active bans as ``target -> until`` (rule
and line live in SQLite), offender history as one packed int per target, and recent
match times only for rules that ask for more than one match.

Time comes from the LOG (``match.time``), so catching up on a backlog bans until the
line's time + ban time and skips bans that would already be over.  The storm guard's
rate runs on log time too, one bucket per source: it refuses a flood as the log wrote
it (more new offenders in a second of log than storm.max_per_second), while a backlog
read after downtime is spread over the hours it covers and is banned in full.  Lines
without a stamp have no log time: the wall clock ``now`` stands in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING

from rblguard.addresses import family, network_text, subnet_key
from rblguard.decisions.allowlist import span
from rblguard.durations import parse_duration
from rblguard.model import Ban, BanPolicy, Match, Offender

if TYPE_CHECKING:
    from rblguard.config import Config, RepeatSettings, StormSettings, SubnetSettings
    from rblguard.decisions.allowlist import Allowlist

__all__ = ["BanPolicy", "Decider", "DecisionSettings", "Verdict"]

RECENT_LIMIT = 200_000  # (rule, target) pairs waiting to reach their rule's count
BUCKET_LIMIT = 1024  # storm-rate buckets (one per source); more are never configured
DEFAULT_FORGET_AFTER = 30 * 86400.0  # history kept with `repeat: off` (it is unused then)
_COUNT_BITS = 8  # history packs last_ban (whole seconds) << 8 | min(bans, 255)
_COUNT_MASK = (1 << _COUNT_BITS) - 1


@dataclass(frozen=True, slots=True)
class DecisionSettings:
    """The config keys decisions depend on, and nothing else."""

    ban_time: float = 3600.0
    repeat: RepeatSettings | None = None
    ipv6_prefix: int = 64
    ipv4_subnet: SubnetSettings | None = None
    storm: StormSettings | None = None

    @classmethod
    def from_config(cls, config: Config) -> DecisionSettings:
        return cls(ban_time=config.ban_time, repeat=config.repeat,
                   ipv6_prefix=config.ipv6_prefix, ipv4_subnet=config.ipv4_subnet,
                   storm=config.storm)


@dataclass(slots=True)
class Verdict:
    """What one match (or one admin request) led to.

    ``bans`` go to the kernel (a subnet escalation adds a second one); ``refused`` names
    why a ban was not made (``allowlist``, ``storm_active``, ``storm_rate``) and
    ``message`` says it for an admin; ``pending`` means the rule's count is not reached
    yet; ``stale`` that the ban would already have expired (an old backlog line);
    ``refreshed`` that an active ban was extended.
    """

    bans: list[Ban] = field(default_factory=list)
    refused: str | None = None
    pending: bool = False
    stale: bool = False
    refreshed: bool = False
    message: str | None = None


class Decider:
    """Turns matches and admin requests into bans; holds the active ones in memory."""

    def __init__(self, settings: DecisionSettings, allowlist: Allowlist) -> None:
        self.settings = settings
        self.allowlist = allowlist
        self._active: dict[str, float] = {}  # target -> until (Unix time)
        # active bans per family, kept with _active: read by the metrics scrape in its
        # own thread, where iterating _active would race the main loop (two ints: safe)
        self._counts = {4: 0, 6: 0}
        self._history: dict[str, int] = {}  # target -> int(last_ban) << 8 | bans
        self._recent: dict[tuple[str, str], list[float]] = {}
        self._subnet_singles: dict[str, int] = {}  # "198.18.5.0/24" -> active singles in it
        self._earliest = float("inf")  # no active ban ends before this: expire() is cheap
        self._buckets: dict[str, list[float]] = {}  # source -> [tokens, its log clock]
        self.refusals: dict[str, int] = {}

    @property
    def forget_after(self) -> float:
        """How long an offender's history is kept without a ban."""
        repeat = self.settings.repeat
        return repeat.forget_after if repeat is not None else DEFAULT_FORGET_AFTER

    # -- start-up, reload ----------------------------------------------------------

    def load(self, bans: Iterable[Ban], history: Iterable[Offender]) -> None:
        """Take the saved bans and history (from State) at start-up."""
        pairs = [(ban.target, ban.until) for ban in bans]
        if pairs:  # the daemon streams its bans through load_active, and passes none
            self.load_active(pairs)
        for target, count, last_ban in history:
            self._history[target] = int(last_ban) << _COUNT_BITS | min(count, _COUNT_MASK)

    def load_active(self, bans: Iterable[tuple[str, float]]) -> None:
        """Take saved (target, until) pairs, e.g. from State.active_ban_chunks;
        a target given twice keeps its latest end.

        A restart loads every saved ban before it is ready, so the loop does only the
        dict work; the subnet and family counts and the earliest end are recomputed
        once at the end (C-level passes over the dict)."""
        active = self._active
        get = active.get
        try:
            for target, until in bans:
                old = get(target)
                if old is None or until > old:
                    active[target] = until
        finally:  # a read error part-way: what was read counts
            self._recount()

    def _recount(self) -> None:
        """Subnet singles, family counts and earliest end, from _active."""
        active = self._active
        sub = self.settings.ipv4_subnet
        self._subnet_singles.clear()
        if sub is not None:
            singles = self._subnet_singles
            for target in active:
                key = subnet_key(target, sub.prefix)
                if key is not None:
                    singles[key] = singles.get(key, 0) + 1
        v6 = sum(map(str.__contains__, active, repeat(":")))
        self._counts = {4: len(active) - v6, 6: v6}
        self._earliest = min(active.values(), default=float("inf"))

    def set_allowlist(self, allowlist: Allowlist) -> None:
        self.allowlist = allowlist

    # -- the log's matches -----------------------------------------------------------

    def on_match(self, match: Match, policy: BanPolicy, now: float,
                 source: str = "") -> Verdict:
        """Decide what one RBL reject means.  Never raises for an odd address.

        ``source`` names the log the match came from: each has its own storm-rate
        bucket, filled by the advance of that log's own time.
        """
        address = match.address
        when = match.time if match.time is not None else now
        if self.allowlist.contains(address):
            return self._refuse("allowlist", f"{address} is allowlisted "
                                f"({self.allowlist.reason(address)})")
        target = self._target(address)
        if policy.count > 1 and not self._threshold_reached(match.rule, target, when, policy):
            return Verdict(pending=True)
        active_until = self._covering_until(target)
        if active_until is not None and active_until[1] > when:
            target = active_until[0]  # already banned (maybe by its subnet): a refresh
        active = self._active.get(target, 0.0) > when
        previous = self._previous_bans(target, when) - (1 if active else 0)
        until = when + self._duration(policy, max(0, previous))
        if until <= now:
            return Verdict(stale=True)
        if active:
            old = self._active[target]
            if until <= old:
                return Verdict()  # the kernel already holds it at least this long
            self._set_active(target, until)
            return Verdict(bans=[Ban(target, until, match.rule, match.line)], refreshed=True)
        refusal = self._storm_check(source, when, 1)
        if refusal:
            return refusal
        self._set_active(target, until)
        self._remember_ban(target, when)
        bans = [Ban(target, until, match.rule, match.line)]
        subnet_ban = self._subnet_escalation(target, until, match.rule, match.line, source,
                                             when)
        if subnet_ban is not None:
            bans.append(subnet_ban)
        return Verdict(bans=bans)

    def _target(self, address: str) -> str:
        """The address, or its IPv6 /ipv6_prefix network unless that covers an allowlisted
        address (then the single address: never let a prefix ban hit a friend)."""
        plen = self.settings.ipv6_prefix
        if ":" not in address or plen >= 128:
            return address
        net = ipaddress.IPv6Network(f"{address}/{plen}", strict=False)
        if self.allowlist.overlaps(net):
            return address
        return str(net)

    def _covering_until(self, target: str) -> tuple[str, float] | None:
        """The active subnet ban that already covers a single IPv4 address, if any."""
        sub = self.settings.ipv4_subnet
        net = subnet_key(target, sub.prefix) if sub is not None else None
        if net is None:
            return None
        until = self._active.get(net)
        return (net, until) if until is not None else None

    def _threshold_reached(self, rule: str, target: str, when: float,
                           policy: BanPolicy) -> bool:
        key = (rule, target)
        times = self._recent.get(key)
        if times is None:
            if len(self._recent) >= RECENT_LIMIT:  # forget the oldest tenth, stay bounded
                for old in list(self._recent)[: RECENT_LIMIT // 10]:
                    del self._recent[old]
            times = self._recent[key] = []
        horizon = when - policy.window
        times[:] = [*[t for t in times if t > horizon][-(policy.count - 1):], when]
        if len(times) < policy.count:
            return False
        del self._recent[key]
        return True

    def _previous_bans(self, target: str, when: float) -> int:
        packed = self._history.get(target)
        if packed is None:
            return 0
        if when - (packed >> _COUNT_BITS) > self.forget_after:
            del self._history[target]
            return 0
        return packed & _COUNT_MASK

    def _duration(self, policy: BanPolicy, previous: int) -> float:
        base = policy.duration if policy.duration is not None else self.settings.ban_time
        repeat = self.settings.repeat
        if repeat is None or previous == 0:
            return base
        cap = max(repeat.max, base)  # a rule's own longer duration is never cut
        try:
            longer = base * repeat.factor ** min(previous, 64)
        except OverflowError:
            return cap
        return min(longer, cap)

    def _remember_ban(self, target: str, when: float) -> None:
        packed = self._history.get(target, 0)
        count = min((packed & _COUNT_MASK) + 1, _COUNT_MASK)
        self._history[target] = int(when) << _COUNT_BITS | count

    def _subnet_escalation(self, target: str, until: float, rule: str, line: str,
                           source: str, when: float) -> Ban | None:
        """Ban the IPv4 subnet once ``after`` of its addresses are banned (singles stay)."""
        sub = self.settings.ipv4_subnet
        key = subnet_key(target, sub.prefix) if sub is not None else None
        if sub is None or key is None:
            return None
        net = ipaddress.IPv4Network(key)
        count = self._subnet_singles.get(key, 0)  # already counts target (_set_active)
        if count < sub.after or key in self._active or self.allowlist.overlaps(net):
            return None
        if self._storm_check(source, when, 1) is not None:
            return None
        self._set_active(key, until)
        return Ban(key, until, rule, f"{count} addresses of {key} banned; last: {line}")

    # -- storm guard -----------------------------------------------------------------

    def _storm_check(self, source: str, when: float, n: int) -> Verdict | None:
        """Refuse new bans past max_active, or faster than max_per_second (a token
        bucket per source, refilled by the advance of that source's log time ``when``).

        Log time going backwards (a bogus stamp, then good ones) only moves the clock
        back without refilling: one bad stamp can never stop banning.
        """
        storm = self.settings.storm
        if storm is None:
            return None
        if len(self._active) + n > storm.max_active:
            return self._refuse("storm_active", f"{len(self._active)} active bans reached "
                                f"storm.max_active ({storm.max_active})")
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= BUCKET_LIMIT:
                self._buckets.clear()
            bucket = self._buckets[source] = [storm.max_per_second, when]
        elapsed = max(0.0, when - bucket[1])
        bucket[0] = min(storm.max_per_second, bucket[0] + elapsed * storm.max_per_second)
        bucket[1] = when
        if bucket[0] < n:
            return self._refuse("storm_rate", "more than storm.max_per_second "
                                f"({storm.max_per_second:g}) new bans in a second of log")
        bucket[0] -= n
        return None

    def _refuse(self, reason: str, message: str) -> Verdict:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1
        return Verdict(refused=reason, message=message)

    # -- the admin's requests ----------------------------------------------------------

    def on_manual(self, target: str, duration: float | str | None, reason: str,
                  force: bool, now: float) -> Verdict:
        """``rblguard ban``: exactly ``duration`` from now (shorter replaces longer).

        Storm limits do not apply to an admin; the allowlist does unless ``force``.
        """
        try:
            net = ipaddress.ip_network(target, strict=False)
        except ValueError:
            return Verdict(refused="invalid", message=f"{target!r} is not an address or "
                           "CIDR network")
        canonical = network_text(net)
        if not force and self.allowlist.overlaps(net):
            return self._refuse("allowlist", f"{canonical} is allowlisted "
                                f"({self.allowlist.reason(canonical)}); use --force to "
                                "ban it anyway")
        try:
            seconds = (self.settings.ban_time if duration is None
                       else parse_duration(duration))
        except ValueError as exc:
            return Verdict(refused="invalid", message=str(exc))
        refreshed = canonical in self._active
        until = now + seconds
        self._set_active(canonical, until)
        return Verdict(bans=[Ban(canonical, until, "manual", reason)], refreshed=refreshed)

    def restore(self, target: str, until: float | None) -> None:
        """Put back what ``target`` had before a ban the kernel refused (None: none)."""
        if until is None:
            self.unban(target)
        else:
            self._set_active(target, until)

    def unban(self, target: str) -> bool:
        """Forget an active ban; False if there was none.  Its history stays."""
        until = self._active.pop(target, None)
        if until is None:
            return False
        self._single_gone(target)
        self._counts[family(target)] -= 1
        return True

    def overlapping(self, target: str) -> list[str]:
        """Every active ban that would still block some of ``target``: for an address,
        each ban covering it (itself, its /24, its IPv6 /64, an admin's /48); for a
        network, also each ban inside it."""
        net = ipaddress.ip_network(target, strict=False)
        found = []
        for plen in range(net.prefixlen, -1, -1):  # target itself and every supernet
            sup = net if plen == net.prefixlen else net.supernet(new_prefix=plen)
            text = network_text(sup)
            if text in self._active:
                found.append(text)
        if net.prefixlen < net.max_prefixlen:  # bans inside the network
            lo, hi = int(net.network_address), int(net.broadcast_address)
            for other in self._active:
                s = span(other)
                if (s is not None and s[0] == net.version and lo <= s[1] and s[2] <= hi
                        and other not in found):
                    found.append(other)
        return found

    def flush(self) -> None:
        self._active.clear()
        self._subnet_singles.clear()
        self._counts = {4: 0, 6: 0}
        self._earliest = float("inf")

    # -- housekeeping and reporting ----------------------------------------------------

    def expire(self, now: float) -> list[str]:
        """Drop bans over at ``now`` from memory (the kernel has already dropped them)."""
        if now < self._earliest:
            return []
        gone = [t for t, until in self._active.items() if until <= now]
        for target in gone:
            del self._active[target]
            self._single_gone(target)
            self._counts[family(target)] -= 1
        self._earliest = min(self._active.values(), default=float("inf"))
        # history past forget_after, checked at the same pace
        horizon = int(now - self.forget_after)
        old = [t for t, p in self._history.items() if (p >> _COUNT_BITS) < horizon]
        for target in old:
            del self._history[target]
        return gone

    def history_updates(self, bans: Iterable[Ban]) -> list[Offender]:
        """The history records of these bans' targets, for State.commit."""
        out = []
        for ban in bans:
            packed = self._history.get(ban.target)
            if packed is not None:
                out.append(Offender(ban.target, packed & _COUNT_MASK,
                                    float(packed >> _COUNT_BITS)))
        return out

    def active_counts(self) -> dict[int, int]:
        """Active bans per family (4, 6): kept as bans come and go, so any thread may
        ask at any time (the metrics scrape does, from prometheus_client's thread)."""
        counts = self._counts
        return {4: counts[4], 6: counts[6]}

    def untils(self, targets: Iterable[str]) -> Iterator[float | None]:
        """The end of each target's ban (None if it has none), by a C-level map."""
        return map(self._active.get, targets)

    def active_targets(self) -> list[str]:
        """Every target with a running ban: a snapshot of the keys (cheap beside
        active_items, which copies a pair per ban)."""
        return list(self._active)

    def active_items(self) -> Iterator[tuple[str, float]]:
        return iter(list(self._active.items()))

    def until(self, target: str) -> float | None:
        return self._active.get(target)

    def history_of(self, target: str) -> int:
        """How many times ``target`` was banned (0 if forgotten or never)."""
        return self._history.get(target, 0) & _COUNT_MASK

    def __len__(self) -> int:
        return len(self._active)

    # -- internals -------------------------------------------------------------------

    def _set_active(self, target: str, until: float) -> None:
        if target not in self._active:
            self._counts[family(target)] += 1
            sub = self.settings.ipv4_subnet
            key = subnet_key(target, sub.prefix) if sub is not None else None
            if key is not None:
                self._subnet_singles[key] = self._subnet_singles.get(key, 0) + 1
        self._active[target] = until
        if until < self._earliest:
            self._earliest = until

    def _single_gone(self, target: str) -> None:
        sub = self.settings.ipv4_subnet
        key = subnet_key(target, sub.prefix) if sub is not None else None
        if key is None:
            return
        left = self._subnet_singles.get(key, 0) - 1
        if left > 0:
            self._subnet_singles[key] = left
        else:
            self._subnet_singles.pop(key, None)
