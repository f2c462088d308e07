"""Client addresses as rblguard stores and bans them: one canonical spelling each.

``::ffff:198.18.5.124`` (an IPv4 client seen by an IPv6 socket) is the IPv4 client
``198.18.5.124``; ``2001:DB8:0::17`` is ``2001:db8::17``.  One spelling per client is
what makes counting, thresholds and bans agree.  Nothing is skipped for being private or
reserved: only the allowlist exempts an address.
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import re

# socket's own C module: the socket module adds enums and imports selectors (2-3 ms
# of every command's start) for nothing these four names need
from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton
from collections.abc import Mapping
from itertools import repeat

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_PLAIN_IPV4_LINES = re.compile(rb"^" + _OCTET.encode() + rb"(?:\." + _OCTET.encode()
                               + rb"){3}$", re.MULTILINE)
_PTON6 = functools.partial(inet_pton, AF_INET6)
_NTOP6 = functools.partial(inet_ntop, AF_INET6)
# how inet_ntop prints an IPv4-mapped address, one per line: the IPv4 part is canonical
_MAPPED_PRINTED = re.compile(r"^::ffff:(?=\d+\.\d+\.\d+\.\d+$)", re.MULTILINE)
_COMPAT_PRINTED = re.compile(r"^[0-9a-f:]*:[0-9]*\.[0-9.]+$", re.MULTILINE)
_cache: dict[str, str | None] = {}
# canonical_bytes()'s memory, public so that the scanner's hot loop can try a dict
# lookup before paying for a call.  Read it; only canonical_bytes() writes it.
BYTES_CACHE: dict[bytes, str | None] = {}
_CACHE_LIMIT = 65536


def canonical_bytes(raw: bytes) -> str | None:
    """canonical_address() of an address as the log's bytes hold it; the scanner's path."""
    try:
        return BYTES_CACHE[raw]
    except KeyError:
        pass
    result = _canonical_fast(raw)
    if len(BYTES_CACHE) >= _CACHE_LIMIT:
        BYTES_CACHE.clear()
    BYTES_CACHE[raw] = result
    return result


def canonical_counts(found: dict[bytes, int]) -> tuple[dict[str, int], dict[bytes, int]]:
    """(matches per canonical address, matches per spelling that is no address) of
    ``found``, matches per address as the log spells it; counts of 0 or less (every hit
    vetoed) are left out.

    A scan meets tens of thousands of distinct addresses: the plain dotted IPv4 ones,
    nearly all of them and their own canonical form, are picked out by one search over
    all of them and counted in C, not resolved by a call each.  The rest (IPv6,
    IPv4-mapped) are parsed and printed in one batch (_canonical_ipv6); only when one
    of them is odd do they go through canonical_bytes() one by one.  Two spellings of
    one client (``::ffff:198.18.5.124`` and ``198.18.5.124``) add up.
    """
    if found and min(found.values()) <= 0:
        found = {raw: n for raw, n in found.items() if n > 0}
    joined = b"\n".join(found)
    # one address per line, unless a (hostile) rule let a newline into one
    plain = (_PLAIN_IPV4_LINES.findall(joined)
             if joined.count(b"\n") == len(found) - 1 else [])
    counts = dict(zip(b"\n".join(plain).decode("ascii").split("\n") if plain else (),
                      map(found.__getitem__, plain), strict=True))
    unparsable: dict[bytes, int] = {}
    if len(plain) < len(found):
        rest = list(found.keys() - set(plain))
        resolved = _canonical_ipv6(rest)
        if resolved is not None and len(set(resolved)) == len(resolved):
            add_counts(counts, dict(zip(resolved, map(found.__getitem__, rest),
                                        strict=True)))
        else:
            for raw, address in zip(rest, resolved or map(canonical_bytes, rest),
                                    strict=True):
                if address is None:
                    unparsable[raw] = found[raw]
                else:
                    counts[address] = counts.get(address, 0) + found[raw]
    return counts, unparsable


def add_counts(mine: dict, theirs: Mapping) -> None:
    """``mine[k] += n`` (from 0) for each ``k: n`` of ``theirs``, in C: Counter.update
    loops in Python, and a scan adds tens of thousands of addresses' counts at once."""
    keys = theirs.keys()
    dict.update(mine, zip(keys, map(operator.add, map(mine.get, keys, repeat(0)),
                                    theirs.values()), strict=True))


def _canonical_ipv6(raws: list[bytes]) -> list[str] | None:
    """canonical_bytes() of each of ``raws`` if all are IPv6 addresses (IPv4-mapped
    ones included) as inet_pton takes them, else None: a scan's thousands of them
    parsed and printed by C calls in a row, not one Python call each."""
    try:
        texts = b"\n".join(raws).decode("ascii").split("\n")
        packed = list(map(_PTON6, texts))
    except (UnicodeDecodeError, OSError, ValueError):  # one that is odd: one at a time
        return None
    printed = "\n".join(map(_NTOP6, packed))
    if "." in printed:  # the C library prints IPv4-mapped ones as ::ffff:198.18.5.124
        printed = _MAPPED_PRINTED.sub("", printed)  # a literal "": no Python per hit
    out = printed.split("\n")
    if len(out) != len(raws):
        return None
    # IPv4-compatible ones (see _ipv6_text), the only dotted ones left: searching for
    # them costs a tenth of the batch, so the one C test for a dot comes first
    if "." in printed and _COMPAT_PRINTED.search(printed):
        out = [_ipv6_text(p) if "." in a and ":" in a else a
               for a, p in zip(out, packed, strict=True)]
    return out


def _canonical_fast(raw: bytes) -> str | None:
    """canonical_address() for the spellings logs hold, without the ipaddress module.

    ``inet_pton``/``inet_ntop`` are the C library's strict parser and canonical printer
    (RFC 5952: lower case, longest zero run compressed), about a hundred times faster.
    """
    text = raw.decode("ascii", "replace")
    if _PLAIN_IPV4.fullmatch(text):
        return text
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:7].lower() == "::ffff:" and _PLAIN_IPV4.fullmatch(text[7:]):
        return text[7:]
    if ":" not in text or "%" in text:
        return canonical_address(text)
    try:
        packed = inet_pton(AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return inet_ntop(AF_INET, packed[12:])
    return _ipv6_text(packed)


def _ipv6_text(packed: bytes) -> str:
    """An IPv6 address (not IPv4-mapped) as canonical_address() spells it.

    The C library prints an IPv4-compatible one (deprecated, RFC 4291) in dotted form,
    ``::1.2.3.4``, where ipaddress says ``::102:304``: that one goes through ipaddress.
    """
    text = inet_ntop(AF_INET6, packed)
    return ipaddress.IPv6Address(packed).compressed if "." in text else text


def canonical_address(text: str) -> str | None:
    """The canonical form of an IPv4/IPv6 address, or None if ``text`` is not one.

    Called once per reject line, so the common case (plain dotted IPv4) skips the
    ipaddress module, and everything else is cached: spammers retry from the same
    addresses.
    """
    if _PLAIN_IPV4.fullmatch(text):
        return text
    try:
        return _cache[text]
    except KeyError:
        pass
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        addr = ipaddress.ip_address(candidate)
    except ValueError:
        result = None
    else:
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.scope_id is not None:
                result = None  # a link-local zone cannot be banned by address alone
            elif addr.ipv4_mapped is not None:
                result = str(addr.ipv4_mapped)
            else:
                result = addr.compressed
        else:
            result = str(addr)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()
    _cache[text] = result
    return result


def family(target: str) -> int:
    """4 or 6 for a canonical address or network."""
    return 6 if ":" in target else 4


def subnet_key(target: str, prefix: int) -> str | None:
    """The IPv4 /``prefix`` network holding a single IPv4 address ("198.18.5.0/24"), or
    None for a network or an IPv6 target: the key subnet escalation counts under."""
    if "/" in target or ":" in target:
        return None
    return str(ipaddress.IPv4Network(f"{target}/{prefix}", strict=False))


def network_text(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> str:
    """A network as rblguard spells a target: a full-length one as its bare address."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
