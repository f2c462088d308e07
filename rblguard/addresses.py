"""Client addresses as rblguard stores and bans them: one canonical spelling each.

``::ffff:198.18.5.124`` (an IPv4 client seen by an IPv6 socket) is the IPv4 client
``198.18.5.124``; ``2001:DB8:0::17`` is ``2001:db8::17``.  One spelling per client is
what makes counting, thresholds and bans agree.  Nothing is skipped for being private or
reserved: only the allowlist exempts an address.
"""

from __future__ import annotations

import ipaddress
import re
import socket

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
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
        packed = socket.inet_pton(socket.AF_INET6, text)
    except (OSError, ValueError):
        return None
    if packed[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed)


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
