"""The nftables backend (the default): one table, batched, in-process through libnftables.

What it owns, and nothing else (``nft list table inet rblguard``)::

    set v4, v6          single addresses, flags timeout: the kernel expires each ban
    set v4net, v6net    prefixes (/24, /64), flags interval, timeout
    set seen4, seen6    (address . source port . TCP sequence) of dropped SYNs, 130 s
    counter conn4/6     blocked NEW connections;  counter retx4/6: their retransmitted SYNs
    chain input         hook input, priority -10 by default: after conntrack (-200), before
                        the usual filter chains (0). Members of the sets, TCP to the
                        configured ports, conntrack state NEW only -> chain ban4/ban6
    chain ban4, ban6    count (a connection once, however often its SYN is retransmitted)
                        and drop

Only NEW connections are dropped: a session already under way gets its 451/553 from
rblsmtpd and ends normally, instead of hanging on to one of tcpserver's few slots.

Singles and prefixes live in separate sets because an interval set refuses an address
that a prefix there already covers, and one refused element fails the whole batch.
Should a batch fail anyway, it is split until the bad entries are isolated, so the
good ones land and the bad ones are reported.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Sequence
from operator import attrgetter

from rblguard.firewall.base import (
    INVALID,
    OVERLAP,
    REFUSED,
    Backend,
    BatchResult,
    Counters,
    Entry,
    FirewallError,
    FirewallOptions,
    Health,
    Listed,
)

BATCH = 10_000  # elements per nft command: large enough to be fast, small enough to parse
MAX_TIMEOUT = 365 * 86400
SEEN_TIMEOUT = 130  # s: a SYN's retransmits (1, 3, 7, 15, 31, 63 s) stay one connection
SEEN_SIZE = 262_144
SETS = ("v4", "v4net", "v6", "v6net")
_TIMEOUT = attrgetter("timeout")
_REFRESH = attrgetter("refresh")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PLAIN_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_PLAIN_IPV4_LINES = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}(?:\n{_OCTET}(?:\.{_OCTET}){{3}})*")


def _element_texts(elements: list[str], entries: list[Entry], refresh: bool) -> list[str]:
    """``<element> timeout <s>s [expires <s>s]`` for each entry, its timeout clamped to
    1 s .. MAX_TIMEOUT; formatted by ``map`` (a C loop: ~0.2 us an element)."""
    seconds = list(map(int, map(_TIMEOUT, entries)))
    if seconds and (min(seconds) < 1 or max(seconds) > MAX_TIMEOUT):
        seconds = [max(1, min(s, MAX_TIMEOUT)) for s in seconds]
    if refresh:
        return list(map("%s timeout %ds expires %ds".__mod__,
                        zip(elements, seconds, seconds, strict=True)))
    return list(map("%s timeout %ds".__mod__, zip(elements, seconds, strict=True)))


def _set_for(target: str) -> tuple[str, str]:
    """(set name, element text) for a canonical address or CIDR network."""
    if _PLAIN_IPV4.fullmatch(target):  # the common case, without the ipaddress module
        return "v4", target
    if "/" not in target and ":" in target:
        try:  # an IPv6 single: inet_pton checks it in 0.2 us, ipaddress in 10 us
            socket.inet_pton(socket.AF_INET6, target)
            return "v6", target
        except OSError:
            pass  # let ipaddress say what is wrong with it
    if "/" in target:
        net = ipaddress.ip_network(target, strict=False)
        if net.prefixlen == net.max_prefixlen:
            return ("v4" if net.version == 4 else "v6"), str(net.network_address)
        return ("v4net" if net.version == 4 else "v6net"), str(net)
    addr = ipaddress.ip_address(target)
    return ("v4" if addr.version == 4 else "v6"), str(addr)


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(self, options: FirewallOptions) -> None:
        import nftables  # Debian's python3-nftables or PyPI's pip-nftables

        self._nftables = nftables
        self.options = options
        self.table = f"inet {options.table}"
        self.nft = nftables.Nftables()  # for changes, for the daemon's whole life

    # -- plumbing ------------------------------------------------------------------

    def _run(self, command: str, *, json_output: bool = False, terse: bool = False) -> str:
        """Run nft commands.  Reads (JSON) go through a fresh context: libnftables keeps
        what a listing fetched in its context's cache and searches it linearly on every
        later change, which made unbanning 10,000 after listing 100,000 take 30 s."""
        nft = self.nft
        if json_output:
            nft = self._nftables.Nftables()
            nft.set_json_output(True)
            nft.set_terse_output(terse)
        rc, out, err = nft.cmd(command)
        if rc != 0:
            first = command.strip().splitlines()[0][:200]
            raise FirewallError(f"nft refused '{first}': {err.strip()}")
        return out

    def _table_json(self) -> list[dict]:
        """The whole table, every set element included: ~0.6 s per 100,000 elements,
        and more than linear beyond (the kernel's dump of a set restarts its walk for
        every message).  Only list() needs it; never call it from the daemon's loop.
        nftables keeps no count of a set's elements, so there is no cheap
        entry_counts() either: the daemon knows its bans without asking the kernel."""
        try:
            out = self._run(f"list table {self.table}", json_output=True)
        except FirewallError:
            return []
        return json.loads(out).get("nftables", [])

    def _declarations(self) -> list[dict]:
        """The table's objects (table, sets without their elements, counters with their
        values, chains, rules), in about a millisecond however many elements the sets
        hold.  Of nft 1.0.6's listings only ``list ruleset`` with terse output skips the
        elements in the kernel dump; ``list table``, ``list counters`` and ``list chain``
        fetch every element into the cache even when terse output does not print them
        (1.2 s with 200,000 elements)."""
        out = self._run("list ruleset inet", json_output=True, terse=True)
        name = self.options.table
        found = []
        for item in json.loads(out).get("nftables", []):
            for kind, obj in item.items():
                if kind == "metainfo" or not isinstance(obj, dict):
                    continue
                owner = obj.get("name") if kind == "table" else obj.get("table")
                if owner == name and obj.get("family") == "inet":
                    found.append(item)
        return found

    # -- objects -------------------------------------------------------------------

    def _ruleset(self) -> str:
        t, o = self.table, self.options
        ports = ("tcp dport { " + ", ".join(str(p) for p in o.ports) + " }"
                 if o.ports else "meta l4proto tcp")
        lines = [
            f"add table {t}",
            f"add set {t} v4 {{ type ipv4_addr; flags timeout; }}",
            f"add set {t} v4net {{ type ipv4_addr; flags interval, timeout; }}",
            f"add set {t} v6 {{ type ipv6_addr; flags timeout; }}",
            f"add set {t} v6net {{ type ipv6_addr; flags interval, timeout; }}",
            f"add set {t} seen4 {{ typeof ip saddr . tcp sport . tcp sequence; "
            f"flags dynamic, timeout; size {SEEN_SIZE}; }}",
            f"add set {t} seen6 {{ typeof ip6 saddr . tcp sport . tcp sequence; "
            f"flags dynamic, timeout; size {SEEN_SIZE}; }}",
        ]
        lines += [f"add counter {t} {name}" for name in ("conn4", "retx4", "conn6", "retx6")]
        lines += [
            f"add chain {t} input {{ type filter hook input priority {o.priority}; "
            "policy accept; }",
            f"add chain {t} ban4",
            f"add chain {t} ban6",
            f"flush chain {t} input",
            f"flush chain {t} ban4",
            f"flush chain {t} ban6",
        ]
        for family, ip, sets in (("4", "ip", ("v4", "v4net")), ("6", "ip6", ("v6", "v6net"))):
            lines += [f"add rule {t} input {ports} ct state new {ip} saddr @{s} jump ban{family}"
                      for s in sets]
            key = f"{ip} saddr . tcp sport . tcp sequence"
            lines += [
                f'add rule {t} ban{family} {key} @seen{family} counter name "retx{family}" drop',
                f"add rule {t} ban{family} add @seen{family} {{ {key} timeout {SEEN_TIMEOUT}s }}"
                f' counter name "conn{family}" drop',
                # the seen set is full: still drop, counted as a new connection
                f'add rule {t} ban{family} counter name "conn{family}" drop',
            ]
        return "\n".join(lines) + "\n"

    def ensure(self) -> None:
        self._run(self._ruleset())

    def remove(self) -> None:
        if self._declarations():
            self._run(f"delete table {self.table}")

    def flush(self) -> None:
        self._run("".join(f"flush set {self.table} {s}\n" for s in SETS))

    # -- bans ----------------------------------------------------------------------

    def ban(self, entries: Sequence[Entry]) -> BatchResult:
        """Add or refresh in batches; ``expires`` resets the clock of an existing element
        (only for entries that may be refreshes: it costs about a fifth of the add).

        libnftables parses ~350,000 elements a second, so the Python side must stay
        well under a microsecond an element: entries are sorted into sets with one
        cheap test each, IPv4 text is checked by one regex over the whole group, and
        element texts are formatted by C-level ``map`` calls, not a Python loop."""
        result = BatchResult()
        plain: list[Entry] = []  # no ":" and no "/": IPv4 singles, if the text is valid
        other: list[Entry] = []
        for entry in entries:
            target = entry.target
            if ":" in target or "/" in target:
                other.append(entry)
            else:
                plain.append(entry)
        for name, (group, elements) in self._sort(plain, other, result).items():
            refreshes = sum(map(_REFRESH, group))
            if refreshes in (0, len(group)):  # the usual case: one kind per batch
                parts = [(group, elements, bool(refreshes))]
            else:
                parts = [([e for e in group if bool(e.refresh) is flag],
                          [t for e, t in zip(group, elements, strict=True)
                           if bool(e.refresh) is flag], flag) for flag in (False, True)]
            for picked, texts, refresh in parts:
                items = _element_texts(texts, picked, refresh)
                targets = [e.target for e in picked]
                for start in range(0, len(items), BATCH):
                    self._ban_batch(name, items[start:start + BATCH],
                                    targets[start:start + BATCH], result)
        return result

    @staticmethod
    def _sort(plain: list[Entry], other: list[Entry],
              result: BatchResult) -> dict[str, tuple[list[Entry], list[str]]]:
        """Entries by set, each with its element text; bad text refused as INVALID."""
        groups: dict[str, tuple[list[Entry], list[str]]] = {n: ([], []) for n in SETS}
        texts = [e.target for e in plain]
        joined = "\n".join(texts)  # one line per target, unless a target holds a newline
        if texts and not (joined.count("\n") == len(texts) - 1
                          and _PLAIN_IPV4_LINES.fullmatch(joined)):
            good = []
            for entry in plain:  # rare: find the bad ones
                if _PLAIN_IPV4.fullmatch(entry.target):
                    good.append(entry)
                else:
                    other.append(entry)
            plain, texts = good, [e.target for e in good]
        groups["v4"] = (plain, texts)
        for entry in other:
            try:
                set_name, element = _set_for(entry.target)
            except ValueError as exc:
                result.refuse(entry.target, f"not an address or network: {exc}", INVALID)
                continue
            groups[set_name][0].append(entry)
            groups[set_name][1].append(element)
        return groups

    def _ban_batch(self, set_name: str, texts: list[str], targets: list[str],
                   result: BatchResult) -> None:
        try:
            self._run(f"add element {self.table} {set_name} {{ {', '.join(texts)} }}\n")
            result.done += len(texts)
        except FirewallError as exc:
            if len(texts) == 1:
                # Its text was checked above: what an interval set refuses one element
                # for is an overlap with a network already there.
                result.refuse(targets[0], str(exc),
                              OVERLAP if set_name.endswith("net") else REFUSED)
                return
            half = len(texts) // 2  # isolate the entries the kernel refuses
            self._ban_batch(set_name, texts[:half], targets[:half], result)
            self._ban_batch(set_name, texts[half:], targets[half:], result)

    def unban(self, targets: Sequence[str]) -> BatchResult:
        """Remove each target; an absent one is first added with a 1 s timeout and then
        deleted in the same transaction, so it cannot fail the batch (nft 1.0.6 has no
        ``destroy``)."""
        result = BatchResult()
        unique = list(dict.fromkeys(targets))  # a target twice would fail its batch
        for start in range(0, len(unique), BATCH):
            self._unban_batch(unique[start:start + BATCH], result)
        return result

    def _unban_batch(self, targets: list[str], result: BatchResult) -> None:
        by_set: dict[str, list[str]] = {s: [] for s in SETS}
        for target in targets:
            try:
                set_name, element = _set_for(target)
            except ValueError as exc:
                result.refuse(target, f"not an address or network: {exc}", INVALID)
                continue
            by_set[set_name].append(element)
        lines = []
        for s, items in by_set.items():
            if items:
                lines.append(f"add element {self.table} {s} {{ "
                             + ", ".join(f"{i} timeout 1s" for i in items) + " }")
                lines.append(f"delete element {self.table} {s} {{ {', '.join(items)} }}")
        if not lines:
            return
        try:
            self._run("\n".join(lines) + "\n")
            result.done += sum(len(v) for v in by_set.values())
        except FirewallError as exc:
            if len(targets) == 1:
                result.refuse(targets[0], str(exc))
                return
            half = len(targets) // 2
            self._unban_batch(targets[:half], result)
            self._unban_batch(targets[half:], result)

    def list(self) -> list[Listed]:
        """Every element with its remaining seconds.  A dump of a large set that the
        kernel is changing (or expiring) may repeat elements: each is listed once."""
        listed: list[Listed] = []
        for item in self._table_json():
            nset = item.get("set")
            if not nset or nset.get("name") not in SETS:
                continue
            for elem in nset.get("elem", []):
                inner = elem.get("elem", elem) if isinstance(elem, dict) else elem
                value = inner.get("val") if isinstance(inner, dict) else inner
                expires = inner.get("expires", 0) if isinstance(inner, dict) else 0
                if isinstance(value, dict) and "prefix" in value:
                    value = f"{value['prefix']['addr']}/{value['prefix']['len']}"
                elif isinstance(value, dict) and "range" in value:
                    low, high = value["range"]
                    nets = ipaddress.summarize_address_range(ipaddress.ip_address(low),
                                                             ipaddress.ip_address(high))
                    for net in nets:
                        listed.append(Listed(str(net), float(expires)))
                    continue
                listed.append(Listed(str(value), float(expires)))
        return list({item.target: item for item in listed}.values())

    def counters(self) -> dict[int, Counters]:
        """The named counters' values, from the element-free listing."""
        values: dict[str, int] = {}
        for item in self._declarations():
            counter = item.get("counter")
            if counter:
                values[counter["name"]] = int(counter.get("packets", 0))
        out = {}
        for family in (4, 6):
            conn, retx = values.get(f"conn{family}", 0), values.get(f"retx{family}", 0)
            out[family] = Counters(packets=conn + retx, connections=conn)
        return out

    def health(self) -> Health:
        """Table, sets, counters, chains and their rule counts, from the element-free
        listing: a millisecond with 1,000,000 bans (the daemon asks every 5 s)."""
        try:
            items = self._declarations()
        except FirewallError as exc:
            return Health(False, [str(exc)])
        if not any("table" in i for i in items):
            return Health(False, [f"table {self.table} is missing"])
        problems = []
        sets = {i["set"]["name"] for i in items if "set" in i}
        for name in (*SETS, "seen4", "seen6"):
            if name not in sets:
                problems.append(f"set {name} is missing")
        counters = {i["counter"]["name"] for i in items if "counter" in i}
        for name in ("conn4", "retx4", "conn6", "retx6"):
            if name not in counters:
                problems.append(f"counter {name} is missing")
        rules: dict[str, int] = {}
        chains = set()
        for item in items:
            if "chain" in item:
                chains.add(item["chain"]["name"])
            if "rule" in item:
                rules[item["rule"]["chain"]] = rules.get(item["rule"]["chain"], 0) + 1
        for chain, expected in (("input", 4), ("ban4", 3), ("ban6", 3)):
            if chain not in chains:
                problems.append(f"chain {chain} is missing")
            elif rules.get(chain, 0) != expected:
                problems.append(f"chain {chain} has {rules.get(chain, 0)} rules, "
                                f"expected {expected}")
        return Health(not problems, problems)
