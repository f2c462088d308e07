"""Addresses rblguard must never ban: configured networks, loopback, the host's own
addresses, and every client that qmail's tcprules lets relay (``RELAYCLIENT``).

Only this list exempts an address: nothing is skipped for being private or reserved.
``contains`` is asked once per reject (up to ~100k/s in a wave), so membership is a
bisect in per-family sorted integer ranges behind a small cache.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from itertools import compress, repeat
from operator import ge, not_, or_
from pathlib import Path
from typing import TYPE_CHECKING

from rblguard.decisions.interfaces import interface_addresses

if TYPE_CHECKING:
    from rblguard.config import Config

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_CACHE_LIMIT = 65536
_PTON4 = partial(socket.inet_pton, socket.AF_INET)
_RULE = re.compile(r"^(?P<addr>.*?):(?P<action>allow|deny)(?P<rest>,.*)?$")
_RELAY = re.compile(r"(?:^|,)RELAYCLIENT=")


@dataclass(frozen=True, slots=True)
class Entry:
    """One allowlisted network and where it came from (for ``reason``)."""

    network: Network
    source: str  # "config", "loopback", "host address", "tcprules FILE line N"


def _to_network(net: Network | str) -> Network:
    return net if isinstance(net, Network) else ipaddress.ip_network(net, strict=False)


def address_value(address: str) -> tuple[int, int] | None:
    """``(version, integer)`` of a canonical address, or None if it is not one.

    inet_pton is as strict as ipaddress and about ten times faster, which counts where
    every address of a wave of new offenders is parsed once."""
    version, family = (6, socket.AF_INET6) if ":" in address else (4, socket.AF_INET)
    try:
        return version, int.from_bytes(socket.inet_pton(family, address), "big")
    except (OSError, ValueError):
        return None


def span(target: str) -> tuple[int, int, int] | None:
    """``(version, first, last)`` of a canonical address or CIDR network as integers,
    or None if it does not parse.  Fast (no ipaddress objects): the daemon asks it for
    every active ban when it checks them all against a new allowlist."""
    addr, _, plen_text = target.partition("/")
    parsed = address_value(addr)
    if parsed is None:
        return None
    version, value = parsed
    bits = 128 if version == 6 else 32
    try:
        plen = int(plen_text) if plen_text else bits
    except ValueError:
        return None
    if not 0 <= plen <= bits:
        return None
    host = (1 << (bits - plen)) - 1
    return version, value & ~host, value | host


class Allowlist:
    """Networks never to ban, with fast membership and overlap tests."""

    def __init__(self, entries: Iterable[Entry], warnings: Iterable[str] = ()) -> None:
        self.entries = tuple(entries)
        self.warnings = list(warnings)
        self._starts: dict[int, list[int]] = {4: [], 6: []}
        self._ends: dict[int, list[int]] = {4: [], 6: []}
        for version in (4, 6):
            spans = sorted((int(e.network.network_address), int(e.network.broadcast_address))
                           for e in self.entries if e.network.version == version)
            for lo, hi in spans:  # merge overlapping and adjacent spans
                ends = self._ends[version]
                if ends and lo <= ends[-1] + 1:
                    ends[-1] = max(ends[-1], hi)
                else:
                    self._starts[version].append(lo)
                    ends.append(hi)
        self._cache: dict[str, bool] = {}

    @classmethod
    def from_config(cls, config: Config, host: bool = True) -> Allowlist:
        """Config networks + loopback + host addresses (if ``host``) + tcprules relays.

        Problems with tcprules (missing file, name rules) become warnings, logged here:
        a bad tcprules edit must not stop the daemon or a reload.
        """
        entries = [Entry(n, "config") for n in config.allowlist]
        entries += [Entry(n, "loopback") for n in LOOPBACK]
        warnings: list[str] = []
        if host:
            entries += [Entry(n, "host address") for n in host_addresses()]
        if config.tcprules:
            try:
                nets, warnings = parse_tcprules(config.tcprules)
            except OSError as exc:
                warnings = [f"{config.tcprules}: cannot read: {exc.strerror or exc}; "
                            "its RELAYCLIENT hosts are not allowlisted"]
                nets = []
            entries += nets
        for warning in warnings:
            log.warning("%s", warning)
        return cls(entries, warnings)

    def contains(self, address: str) -> bool:
        """Whether a canonical address is allowlisted."""
        try:
            return self._cache[address]
        except KeyError:
            pass
        parsed = address_value(address)
        if parsed is None:
            return False
        version, value = parsed
        i = bisect.bisect_right(self._starts[version], value) - 1
        found = i >= 0 and self._ends[version][i] >= value
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[address] = found
        return found

    def overlaps(self, network: Network | str) -> bool:
        """Whether banning ``network`` would also ban an allowlisted address."""
        net = _to_network(network)
        lo, hi = int(net.network_address), int(net.broadcast_address)
        i = bisect.bisect_right(self._starts[net.version], hi) - 1
        return i >= 0 and self._ends[net.version][i] >= lo

    def overlapping(self, targets: Iterable[str]) -> list[str]:
        """The targets (addresses or networks) that hold an allowlisted address.

        A start checks every saved ban (100,000 in ~25 ms): IPv4 singles are parsed and
        looked up by C-level maps (inet_pton, bisect), the rest one by one."""
        texts = list(targets)
        odd = list(map(or_, map(str.__contains__, texts, repeat(":")),
                       map(str.__contains__, texts, repeat("/"))))
        plain = list(compress(texts, map(not_, odd)))
        try:
            values = list(map(int.from_bytes, map(_PTON4, plain)))
        except (OSError, TypeError, ValueError):  # some text is not an address
            plain, values = [], []
            odd = [True] * len(texts)
        starts = self._starts[4]
        found = set()
        if starts:
            # the end of the span that starts at or before each value, -1 for none
            ends = [-1, *self._ends[4]]
            found = set(compress(plain, map(ge, map(ends.__getitem__, map(
                bisect.bisect_right, repeat(starts), values)), values)))
        found.update(self._overlapping_spans(compress(texts, odd)))
        return [t for t in texts if t in found] if found else []

    def _overlapping_spans(self, targets: Iterable[str]) -> list[str]:
        found = []
        starts, ends = self._starts, self._ends
        for target in targets:
            s = span(target)
            if s is None:
                continue
            version, lo, hi = s
            i = bisect.bisect_right(starts[version], hi) - 1
            if i >= 0 and ends[version][i] >= lo:
                found.append(target)
        return found

    def reason(self, target: str) -> str | None:
        """Which entry allowlists ``target`` (an address or network), or None."""
        try:
            net = _to_network(target)
        except ValueError:
            return None
        for entry in self.entries:
            if entry.network.version == net.version and entry.network.overlaps(net):
                return f"{entry.network} from {entry.source}"
        return None

    def __len__(self) -> int:
        return len(self.entries)


def host_addresses() -> list[Network]:
    """This host's own addresses, as /32 and /128 networks (re-read on every reload).

    Netlink (one RTM_GETADDR dump, interfaces.interface_addresses) sees every address
    of this network namespace; if it is refused, /proc/net/if_inet6 and the host
    name's addresses are the fallback.
    """
    found: set[Network] = set()
    try:
        found.update(ipaddress.ip_network(a) for a in interface_addresses())
        return sorted(found, key=lambda n: (n.version, n))
    except (OSError, ValueError) as exc:  # any netlink trouble: use the fallbacks
        log.debug("netlink address listing failed (%s); using fallbacks", exc)
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            found.add(ipaddress.ip_network(int(hexaddr, 16).to_bytes(16, "big")))
    except (OSError, ValueError, IndexError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(ipaddress.ip_network(str(info[4][0]).split("%")[0]))
    except (OSError, ValueError):
        pass
    return sorted(found, key=lambda n: (n.version, n))


def _ipv4_key(text: str) -> list[Network] | None:
    """Networks named by an IPv4 tcprules key: full, ``10.0.0.`` prefix, ``a.b.c.7-19``."""
    prefix = text.endswith(".")
    parts = text[:-1].split(".") if prefix else text.split(".")
    if not 1 <= len(parts) <= 4 or (prefix and len(parts) == 4) or \
            (not prefix and len(parts) != 4):
        return None
    *head, last = parts
    if not all(p.isdigit() and int(p) <= 255 for p in head):
        return None
    m = re.fullmatch(r"(\d{1,3})(?:-(\d{1,3}))?", last)
    if not m:
        return None
    low, high = int(m.group(1)), int(m.group(2) or m.group(1))
    if high > 255 or low > high:
        return None
    plen = 8 * len(parts)
    nets: list[Network] = []
    for value in range(low, high + 1):
        octets = [*head, str(value)] + ["0"] * (4 - len(parts))
        nets.append(ipaddress.IPv4Network(f"{'.'.join(octets)}/{plen}"))
    return nets


def _ipv6_key(text: str) -> list[Network] | None:
    """An IPv6 key: full address, CIDR, or a prefix of whole groups ending in ``:``."""
    text = text.strip("[]")
    try:
        return [ipaddress.ip_network(text, strict=False)]
    except ValueError:
        pass
    if text.endswith(":") and not text.endswith("::"):
        groups = text[:-1].split(":")
        if 1 <= len(groups) < 8 and all(re.fullmatch(r"[0-9A-Fa-f]{1,4}", g) for g in groups):
            return [ipaddress.IPv6Network(f"{':'.join(groups)}::/{16 * len(groups)}")]
    return None


def _key_networks(key: str) -> list[Network] | None:
    if ":" in key or key.startswith("["):
        return _ipv6_key(key)
    if "/" in key:
        try:
            return [ipaddress.IPv4Network(key, strict=False)]
        except ValueError:
            return None
    return _ipv4_key(key)


def parse_tcprules(path: str | Path) -> tuple[list[Entry], list[str]]:
    """The networks a tcprules source lets relay, and warnings naming file and line.

    tcpserver looks up the most specific key for a client (the full address, then ever
    shorter prefixes, then the empty key) and, for a key written twice, the first line
    wins.  So a relay network loses every more specific key that does not relay (an
    earlier ``:deny`` for one address means that address has no RELAYCLIENT).
    """
    path = Path(path)
    warnings: list[str] = []
    first: dict[Network, tuple[bool, int]] = {}  # key -> (relays?, line)
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}: line {lineno}"
        m = _RULE.match(line)
        if not m:
            warnings.append(f"{where}: {line!r} is not ADDRESS:allow|deny[,VAR=\"...\"]")
            continue
        key, relay = m.group("addr"), m.group("action") == "allow" and bool(
            _RELAY.search(m.group("rest") or ""))
        if key.startswith("="):
            if relay:
                warnings.append(f"{where}: {key!r} is a host name rule; a firewall cannot "
                                "match names, so it is not allowlisted (add its addresses "
                                "to allowlist)")
            continue
        if key == "":
            if relay:
                warnings.append(f"{where}: RELAYCLIENT for everyone makes an open relay; "
                                "rblguard does not allowlist the whole Internet for it")
            continue
        nets = _key_networks(key)
        if nets is None:
            warnings.append(f"{where}: {key!r} is not an address, prefix or range "
                            "rblguard understands; skipped")
            continue
        for net in nets:
            first.setdefault(net, (relay, lineno))
    relays = [(n, ln) for n, (r, ln) in first.items() if r]
    denied = [n for n, (r, _) in first.items() if not r]
    entries: list[Entry] = []
    for net, lineno in relays:
        pieces = [net]
        for inner in denied:
            if inner.version != net.version or inner.prefixlen <= net.prefixlen:
                continue
            next_pieces = []
            for piece in pieces:
                if inner.subnet_of(piece):  # type: ignore[arg-type]
                    next_pieces.extend(piece.address_exclude(inner))  # type: ignore[arg-type]
                else:
                    next_pieces.append(piece)
            pieces = next_pieces
        entries += [Entry(p, f"tcprules {path} line {lineno}") for p in pieces]
    return entries, warnings
