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

import errno
import ipaddress
import json
import os
from collections.abc import Sequence

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
from rblguard.firewall.nfnetlink import SetElementSocket
from rblguard.firewall.nftelements import (
    REFRESH,
    SETS,
    element_texts,
    pick,
    seconds_of,
    set_for,
    sort_entries,
)

BATCH = 10_000  # elements per nft text command: large enough to be fast, small to parse
NETLINK_BATCH = 50_000  # elements per nfnetlink transaction (a restore batch: 2.6 MB)
SEEN_TIMEOUT = 130  # s: a SYN's retransmits (1, 3, 7, 15, 31, 63 s) stay one connection
SEEN_SIZE = 262_144


class NftablesBackend(Backend):
    name = "nftables"

    def __init__(self, options: FirewallOptions) -> None:
        import nftables  # Debian's python3-nftables or PyPI's pip-nftables

        self._nftables = nftables
        self.options = options
        self.table = f"inet {options.table}"
        self.nft = nftables.Nftables()  # for changes, for the daemon's whole life
        # bulk bans of single addresses: opened on first use, False if unusable
        self._elements: SetElementSocket | bool | None = None

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

        Single addresses go to the kernel as one nfnetlink transaction per NETLINK_BATCH
        (nfnetlink.py: ~0.5 us an element where libnftables' parser takes ~2.5 us);
        prefixes, and everything when that socket cannot be used, as ``add element``
        text through libnftables (nftelements.py keeps either path's Python side well
        under a microsecond an element)."""
        result = BatchResult()
        for name, (group, elements, keys) in sort_entries(list(entries), result).items():
            if not group:
                continue
            refreshes = sum(map(REFRESH, group))
            if refreshes in (0, len(group)):  # the usual case: one kind per batch
                parts = [(group, elements, keys, bool(refreshes))]
            else:
                parts = [pick(group, elements, keys, flag) for flag in (False, True)]
            for picked, texts, packed, refresh in parts:
                if not picked or (packed and self._send_keys(name, picked, packed,
                                                             refresh, result)):
                    continue
                self._ban_texts(name, picked, texts, refresh, result)
        return result

    def _ban_texts(self, set_name: str, entries: list[Entry], elements: list[str],
                   refresh: bool, result: BatchResult) -> None:
        """Through libnftables, BATCH elements per ``add element`` command."""
        items = element_texts(elements, seconds_of(entries), refresh)
        targets = [e.target for e in entries]
        for start in range(0, len(items), BATCH):
            self._ban_batch(set_name, items[start:start + BATCH],
                            targets[start:start + BATCH], result)

    def _send_keys(self, set_name: str, entries: list[Entry], keys: list[bytes],
                   refresh: bool, result: BatchResult) -> bool:
        """Ban single addresses through nfnetlink; False (nothing applied) when that
        socket is unusable, so the caller takes the text path."""
        if self._elements is None:
            try:
                self._elements = SetElementSocket(self.options.table)
            except OSError:
                self._elements = False  # no raw netlink here: libnftables does it all
        if not self._elements:
            return False
        seconds = seconds_of(entries)
        start = 0
        try:
            for start in range(0, len(keys), NETLINK_BATCH):
                end = start + NETLINK_BATCH
                self._send_slice(set_name, entries[start:end], keys[start:end],
                                 seconds[start:end], refresh, result)
        except OSError:  # the socket broke: the rest (all of it, maybe) as text
            self.close()
            self._elements = False
            rest = entries[start:]
            self._ban_texts(set_name, rest, [set_for(e.target)[1] for e in rest],
                            refresh, result)
        return True

    def _send_slice(self, set_name: str, entries: list[Entry], keys: list[bytes],
                    seconds: list[int], refresh: bool, result: BatchResult) -> None:
        """One transaction; a refused one is split until the refused entries are alone
        (as _ban_batch does).  A missing table or set refuses everything: raised, so
        the caller repairs the objects instead of getting each entry back refused."""
        assert self._elements
        code = self._elements.add(set_name, keys, seconds, refresh)
        if code == 0:
            result.done += len(keys)
        elif code == errno.ENOENT:
            raise FirewallError(f"nft refused 'add element {self.table} {set_name}': "
                                f"{os.strerror(code)} (table or set missing)")
        elif len(keys) == 1:
            result.refuse(entries[0].target, f"nft refused: {os.strerror(code)}", REFUSED)
        else:
            half = len(keys) // 2
            self._send_slice(set_name, entries[:half], keys[:half], seconds[:half],
                             refresh, result)
            self._send_slice(set_name, entries[half:], keys[half:], seconds[half:],
                             refresh, result)

    def close(self) -> None:
        """The nfnetlink socket; libnftables' context lives as long as the backend."""
        if self._elements:
            self._elements.close()
        self._elements = None

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
                set_name, element = set_for(target)
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
