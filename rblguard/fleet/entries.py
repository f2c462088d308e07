"""What a fleet entry holds, and every check a foreign one must pass before it is a ban.

A stream entry is five short fields: ``v`` (format, "1"), ``t`` the target (address or
CIDR network), ``s`` the ban's remaining seconds when it was written, ``r`` the rule and
``o`` the origin host.  Its stream id carries the Redis server's milliseconds, so the
ban ends at id time + ``s`` on the SERVER's clock: no two hosts' clocks need to agree.
The snapshot of active bans is a sorted set whose member is ``target|rule|origin`` and
whose score is the end in server milliseconds.

Anything in Redis may be hostile (a compromised member, a typo, a stray writer): a
foreign entry is refused unless it is well formed, no wider than an IPv4 /24 or an IPv6
/48, no longer than ``max_duration``, and its origin keeps under its rate cap.  An
origin that floods is quarantined: none of its entries is obeyed until the quarantine
ends.  The allowlist is applied after this, by the decision stage.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

from rblguard.addresses import canonical_address, canonical_bytes
from rblguard.fleet.settings import FleetSettings, valid_member_name

FORMAT = b"1"
MIN_PREFIX = {4: 24, 6: 48}  # shorter prefixes are refused: never a /8 from the hub
FIELD_BYTES = 64  # the longest target, rule or origin read from an entry
# Why a foreign entry was not obeyed: the label of rblguard_fleet_refused_total.
REFUSAL_REASONS = ("malformed", "too_wide", "too_long", "expired", "rate", "quarantined",
                   "allowlist")
_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_SECONDS = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True, slots=True)
class ForeignBan:
    """A ban another fleet member made, checked; ``expires_ms`` and ``written_ms``
    (when the hub took it; 0 for a snapshot row) are the hub's time."""

    target: str
    expires_ms: int
    rule: str
    origin: str
    written_ms: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an entry was not obeyed (one of REFUSAL_REASONS) and from whom, if known."""

    reason: str
    origin: str | None = None
    detail: str = ""


def stream_fields(target: str, seconds: int, rule: str, origin: str) -> dict[str, str]:
    """The fields of one published entry."""
    return {"v": FORMAT.decode(), "t": target, "s": str(seconds), "r": rule, "o": origin}


def snapshot_member(target: str, rule: str, origin: str) -> str:
    """The snapshot's member for a ban: one per target, rule and origin."""
    return f"{target}|{rule}|{origin}"


def parse_id(entry_id: bytes | str) -> tuple[int, int] | None:
    """(milliseconds, sequence) of a stream id, or None if it is not one."""
    text = entry_id.decode("ascii", "replace") if isinstance(entry_id, bytes) else entry_id
    ms, sep, seq = text.partition("-")
    if not (ms.isdigit() and (not sep or seq.isdigit())) or len(ms) > 15:
        return None
    return int(ms), int(seq or 0)


def canonical_target(text: str) -> str | None:
    """The canonical spelling of an address or network, or None if it is neither.
    A single address goes by the C library's parser (canonical_bytes): a resync reads
    100,000 of them, and the ipaddress module takes 15 us for each IPv6 one."""
    if "/" not in text:
        return canonical_bytes(text.encode("ascii"))
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    if net.prefixlen == net.max_prefixlen:
        return canonical_address(str(net.network_address))
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped:
        return None  # an IPv4 range spelt as IPv6: never banned in that form
    return str(net)


def _text(value: object, limit: int = FIELD_BYTES) -> str | None:
    if not isinstance(value, bytes) or len(value) > limit:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def check_target(target: str | None) -> Refusal | None:
    """None if ``target`` (canonical) may be banned from the fleet."""
    if target is None:
        return Refusal("malformed", detail="target is not an address or network")
    if "/" in target:
        plen = int(target.rsplit("/", 1)[1])
        least = MIN_PREFIX[6 if ":" in target else 4]
        if plen < least:
            return Refusal("too_wide", detail=f"{target} is wider than /{least}")
    return None


def parse_entry(fields: dict[bytes, bytes], expires_base_ms: int,
                settings: FleetSettings,
                written_ms: int | None = None) -> ForeignBan | Refusal | None:
    """A stream entry's ban, its refusal, or None for this host's own entry (no echo).

    ``expires_base_ms`` is the entry id's milliseconds (snapshot rows pass their end and
    no ``s``, see parse_snapshot_member).
    """
    origin = _text(fields.get(b"o"))
    if origin is None or not valid_member_name(origin):
        return Refusal("malformed", detail="origin missing or not a member name")
    if origin == settings.name:
        return None
    if fields.get(b"v") != FORMAT:
        return Refusal("malformed", origin, "unknown entry format")
    rule = _text(fields.get(b"r"))
    seconds = _text(fields.get(b"s"), 10)
    target_text = _text(fields.get(b"t"))
    if rule is None or not _RULE.match(rule) or seconds is None \
            or not _SECONDS.match(seconds) or target_text is None:
        return Refusal("malformed", origin, "rule, seconds or target missing or bad")
    target = canonical_target(target_text)
    refusal = check_target(target)
    if refusal is not None:
        return Refusal(refusal.reason, origin, refusal.detail)
    assert target is not None
    secs = int(seconds)
    if secs <= 0:
        return Refusal("malformed", origin, "seconds must be above 0")
    if secs > settings.max_duration:
        return Refusal("too_long", origin, f"{secs} s is above fleet.max_duration")
    return ForeignBan(target, expires_base_ms + secs * 1000, rule, origin,
                      written_ms if written_ms is not None else expires_base_ms)


def parse_snapshot_member(member: bytes, score: float, now_ms: int,
                          settings: FleetSettings) -> ForeignBan | Refusal | None:
    """A snapshot row as parse_entry would see it: same checks, same no-echo."""
    parts = member.split(b"|")
    if len(parts) != 3 or not math.isfinite(score):
        return Refusal("malformed", detail="snapshot member is not target|rule|origin")
    remaining = int((score - now_ms) // 1000)
    if remaining <= 0:
        return Refusal("expired")
    fields = {b"v": FORMAT, b"t": parts[0], b"r": parts[1], b"o": parts[2],
              b"s": str(remaining).encode()}
    return parse_entry(fields, now_ms, settings, written_ms=0)
