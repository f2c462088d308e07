"""The ipset backend, for hosts whose firewall is iptables or shorewall.

Two ``hash:net`` sets (one per family, because an ipset holds one family only) with
kernel timeouts hold the bans.  In ``rules`` mode rblguard also installs one chain per
family that drops NEW TCP connections from the set's members; in ``set-only`` mode the
admin's own firewall references the sets and rblguard only fills them.

Speed: a batch goes through ONE ``ipset -exist restore`` process (one process per
address manages ~1,000/s); small batches (the daemon's steady state) through one netlink
socket kept for the backend's life, which costs no process at all.  ``-exist`` (or a
non-exclusive netlink request) makes a re-ban refresh the timeout and an unban of an
absent address harmless.  iptables is touched at setup time only (``ensure``/``remove``).

Counting connections once (rules mode): a dropped SYN is retransmitted 1, 3, 7, ... s
later, and each retransmit is a NEW packet again (the first one's conntrack entry was
never confirmed), so a plain DROP rule counts packets.  Like the nftables backend's seen
set, a third set per family, ``hash:ip,port`` with a 130 s timeout, remembers the
(source, source port) of each dropped SYN: a packet already in it is a retransmit and
is dropped by a rule of its own; any other one is added (``-j SET --add-set``) and then
dropped by the rule whose counter counts connections.  Health, counters and element
counts read set headers (``ipset list -t``) and rule counters only, never elements.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import subprocess
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import attrgetter

from rblguard.firewall import ipsettext, restore
from rblguard.firewall.base import (
    INVALID,
    SET_FULL,
    Backend,
    BatchResult,
    Counters,
    Entry,
    Failure,
    FirewallError,
    FirewallOptions,
    Health,
    Listed,
)

MAX_TIMEOUT = 2_147_483  # the largest timeout the ipset kernel module accepts, in seconds
NETLINK_MAX = 20  # batches up to this size use netlink; bigger ones one restore process
MULTIPORT_MAX = 15  # iptables' multiport match takes at most 15 ports
IPSET_ERR_HASH_FULL = 4352  # IPSET_ERR_TYPE_SPECIFIC: "Hash is full" for hash:* sets
FULL_TEXT = "set is full"
SEEN_TIMEOUT = 130  # s: a SYN's retransmits (1, 3, 7, 15, 31, 63 s) stay one connection
SEEN_MAXELEM = 262_144
SEEN_SUFFIX = "-seen"
IPSET_NAME_MAX = 31
IPSET_FAMILIES = ((4, "inet"), (6, "inet6"))  # rblguard's family -> ipset's name for it
_LINE_ERROR = re.compile(r"Error in line (\d+): (.*)")
_TOOLS = {4: "iptables", 6: "ip6tables"}
_TARGET = attrgetter("target")
_TIMEOUT = attrgetter("timeout")


def _sh(cmd: Sequence[str], *, input: str | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a tool; a failure becomes a FirewallError that quotes the tool's own words."""
    try:
        proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True,
                              timeout=restore.TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FirewallError(f"{cmd[0]}: {exc}") from exc
    if check and proc.returncode != 0:
        raise FirewallError(f"{' '.join(cmd[:4])}: {proc.stderr.strip() or 'failed'}")
    return proc


def _net(target: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """A comparable form of a target ("198.18.0.1" == "198.18.0.1/32"); bad text as is."""
    try:
        return ipaddress.ip_network(target, strict=False)
    except ValueError:
        return target


def _family(target: str) -> int:
    """4 or 6 by a glance, not a parse: ipaddress costs 4.5 us a target, a third of a
    batch's time; ipset itself rejects bad text, and that line is reported failed."""
    if target.split() != [target] or target[0] == "-":
        raise ValueError(target)  # would break the restore line or read as an option
    return 6 if ":" in target else 4


class IpsetBackend(Backend):
    """Bans in two ipsets; optionally the iptables/ip6tables rules that use them."""

    name = "ipset"

    def __init__(self, options: FirewallOptions) -> None:
        self.options = options
        self.sets = {4: options.set_v4, 6: options.set_v6}
        # (source, source port) of dropped SYNs, rules mode only: connections counted once
        self.seen = {f: name[:IPSET_NAME_MAX - len(SEEN_SUFFIX)] + SEEN_SUFFIX
                     for f, name in self.sets.items()}
        self._nl = None  # pyroute2 IPSet socket, opened on first use

    # ----------------------------------------------------------------- set-up
    def rule_specs(self, family: int) -> list[list[str]]:
        """The rules of our chain, as iptables arguments after ``-A CHAIN``.

        NEW connections only: dropping packets of a session already running would leave
        rblsmtpd waiting on a dead peer and holding one of tcpserver's few slots.  Per
        port chunk three rules: a retransmitted SYN (its source and port in the seen
        set) is dropped; any other is remembered in the seen set, then dropped by the
        rule whose packet counter therefore counts connections.  A full seen set still
        drops; such a connection's retransmits are then counted as connections too.
        """
        match = ["-m", "conntrack", "--ctstate", "NEW",
                 "-m", "set", "--match-set", self.sets[family], "src"]
        seen = self.seen[family]
        ports = self.options.ports
        if ports is None:
            scopes = [["-p", "tcp"]]
        else:
            scopes = [["-p", "tcp", "-m", "multiport", "--dports", ",".join(map(str, c))]
                      for c in (ports[i:i + MULTIPORT_MAX]
                                for i in range(0, len(ports), MULTIPORT_MAX))]
        specs = []
        for scope in scopes:
            specs += [
                [*scope, *match, "-m", "set", "--match-set", seen, "src,src", "-j", "DROP"],
                [*scope, *match, "-j", "SET", "--add-set", seen, "src,src"],
                [*scope, *match, "-j", "DROP"],
            ]
        return specs

    def ensure(self) -> None:
        """Create the sets (kept if present) and, in rules mode, chain, rule and jump."""
        lines = [f"create {self.sets[f]} hash:net family {fam} timeout 0 "
                 f"maxelem {self.options.maxelem}\n" for f, fam in IPSET_FAMILIES]
        names = [self.sets[4], self.sets[6]]
        if self.options.mode == "rules":
            lines += [f"create {self.seen[f]} hash:ip,port family {fam} "
                      f"timeout {SEEN_TIMEOUT} maxelem {SEEN_MAXELEM}\n"
                      for f, fam in IPSET_FAMILIES]
            names += [self.seen[4], self.seen[6]]
        proc = _sh(["ipset", "-exist", "restore"], input="".join(lines), check=False)
        if proc.returncode != 0:
            raise FirewallError(
                f"cannot create the ipsets {'/'.join(names)}: {proc.stderr.strip()}"
                " (a set of that name with other settings exists? `rblguard firewall remove`"
                " first)")
        if self.options.mode == "rules":
            for family in (4, 6):
                self._ensure_rules(family)

    def _ensure_rules(self, family: int) -> None:
        tool, chain = _TOOLS[family], self.options.chain
        specs = self.rule_specs(family)
        listed = _sh([tool, "-w", "-S", chain], check=False)
        exact = (listed.returncode == 0
                 and len(listed.stdout.splitlines()) == 1 + len(specs)
                 and all(self._has(tool, chain, s) for s in specs))
        if not exact:
            # One iptables-restore transaction: the chain is never seen half-filled.
            body = [f"*filter\n:{chain} - [0:0]\n-F {chain}\n"]
            body += [f"-A {chain} {' '.join(s)}\n" for s in specs]
            body.append("COMMIT\n")
            _sh([f"{tool}-restore", "-w", "--noflush"], input="".join(body))
        if not self._has(tool, "INPUT", ["-j", chain]):
            _sh([tool, "-w", "-I", "INPUT", "1", "-j", chain])

    @staticmethod
    def _has(tool: str, chain: str, spec: Sequence[str]) -> bool:
        return _sh([tool, "-w", "-C", chain, *spec], check=False).returncode == 0

    def remove(self) -> None:
        """Drop the jumps and chains (whatever the mode: an old rules setup too), then sets."""
        chain = self.options.chain
        for tool in _TOOLS.values():
            while self._has(tool, "INPUT", ["-j", chain]):
                _sh([tool, "-w", "-D", "INPUT", "-j", chain])
            if _sh([tool, "-w", "-S", chain], check=False).returncode == 0:
                _sh([tool, "-w", "-F", chain])
                _sh([tool, "-w", "-X", chain])
        self.close()
        for name in (*self.seen.values(), *self.sets.values()):
            if name in self._set_names():
                proc = _sh(["ipset", "destroy", name], check=False)
                if proc.returncode != 0:
                    raise FirewallError(
                        f"cannot destroy ipset {name}: {proc.stderr.strip()} (a firewall rule"
                        " of the admin still references it? remove that rule first)")

    def flush(self) -> None:
        for name in self.sets.values():
            _sh(["ipset", "flush", name])

    # ------------------------------------------------------------- bans
    def ban(self, entries: Sequence[Entry]) -> BatchResult:
        """Add or refresh every entry; refused entries come back in ``failed``."""
        result = BatchResult()
        if len(entries) > NETLINK_MAX and self._bulk_ban(entries, result):
            return result
        good: list[tuple[int, str, int]] = []
        for e in entries:
            try:
                good.append((_family(e.target), e.target, max(1, min(e.timeout, MAX_TIMEOUT))))
            except ValueError:
                result.refuse(e.target, "not an address or network", INVALID)
        if len(good) <= NETLINK_MAX and self._netlink_batch(good, True, result):
            return result
        lines = [f"add {self.sets[f]} {t} timeout {s}" for f, t, s in good]
        self._restore(lines, [t for _, t, _ in good], result)
        return result

    def _bulk_ban(self, entries: Sequence[Entry], result: BatchResult) -> bool:
        """A large batch's lines built by C-level maps (a Python step per entry took a
        fifth of the time); False, nothing done, if a target needs _family's checks."""
        texts, seconds = list(map(_TARGET, entries)), list(map(int, map(_TIMEOUT, entries)))
        joined = "\n".join(texts)  # each target one word, none read as an option; times
        if (len(joined.split()) != len(texts) or "\n-" in joined or joined[:1] == "-"
                or min(seconds) < 1 or max(seconds) > MAX_TIMEOUT):  # as they are
            return False
        names = map((self.sets[4], self.sets[6]).__getitem__,
                    map(str.__contains__, texts, repeat(":")))
        self._restore(map("add %s %s timeout %d".__mod__,
                          zip(names, texts, seconds, strict=True)), texts, result)
        return True

    def unban(self, targets: Sequence[str]) -> BatchResult:
        """Delete every target; an absent one counts as done (``del -exist``)."""
        result = BatchResult()
        good: list[tuple[int, str, int]] = []
        for t in targets:
            try:
                good.append((_family(t), t, 0))
            except ValueError:
                result.refuse(t, "not an address or network", INVALID)
        if len(good) <= NETLINK_MAX and self._netlink_batch(good, False, result):
            return result
        self._restore([f"del {self.sets[f]} {t}" for f, t, _ in good],
                      [t for _, t, _ in good], result)
        return result

    def _netlink_batch(self, items: list[tuple[int, str, int]], add: bool,
                       result: BatchResult) -> bool:
        """Apply a small batch over netlink; False (nothing applied) sends it to restore."""
        if not items:
            return True
        try:
            from pyroute2 import IPSet
            from pyroute2.netlink.exceptions import IPSetError
        except ImportError:
            return False
        if self._nl is None:
            try:
                self._nl = IPSet()
            except Exception:  # no netlink here: restore still works
                return False
        refused: list[str] = []
        for i, (family, target, timeout) in enumerate(items):
            fam = socket.AF_INET if family == 4 else socket.AF_INET6
            try:
                if add:
                    self._nl.add(self.sets[family], target, family=fam, exclusive=False,
                                 timeout=timeout, etype="net")
                else:
                    self._nl.delete(self.sets[family], target, family=fam,
                                    exclusive=False, etype="net")
                result.done += 1
            except IPSetError as exc:
                if exc.code == IPSET_ERR_HASH_FULL:
                    refused.append(target)
                    continue
                # Anything else (no such set, a protocol quirk): let restore do the rest
                # and give its own, clearer message.
                self._refused(refused, result)
                self._restore_rest(items[i:], add, result)
                return True
            except Exception:  # a broken socket: reopen next time
                self.close()
                self._refused(refused, result)
                self._restore_rest(items[i:], add, result)
                return True
        self._refused(refused, result)
        return True

    def _refused(self, refused: list[str], result: BatchResult) -> None:
        text = f"{FULL_TEXT} (maxelem {self.options.maxelem}): {len(refused)} entries refused"
        result.failed.extend(Failure(t, text, SET_FULL) for t in refused)

    def _restore_rest(self, items: list[tuple[int, str, int]], add: bool,
                      result: BatchResult) -> None:
        if add:
            lines = [f"add {self.sets[f]} {t} timeout {s}" for f, t, s in items]
        else:
            lines = [f"del {self.sets[f]} {t}" for f, t, _ in items]
        self._restore(lines, [t for _, t, _ in items], result)

    def _restore(self, lines: Iterable[str], targets: list[str], result: BatchResult) -> None:
        """Feed lines to ``ipset -exist restore``; a failing line aborts the rest, so resume.

        ``lines`` may be lazy: they are formatted while the tool parses the ones before
        (rblguard.firewall.restore).  On "Hash is full" the remaining adds to that set
        would all fail one process at a time; instead they are split once: those
        already in the set (a refresh still works in a full set) are retried, the
        others are reported refused.
        """
        pending: list[tuple[str, str]] = []
        full: dict[str, list[str]] = {}
        while True:
            try:
                proc = restore.feed(["ipset", "-exist", "restore"],
                                    lines if not pending else (ln for ln, _ in pending))
            except restore.ToolError as exc:
                raise FirewallError(str(exc)) from exc
            if not pending:
                pending = list(zip(proc.lines, targets, strict=True))
            if proc.returncode == 0:
                result.done += len(pending)
                break
            found = _LINE_ERROR.search(proc.stderr)
            if not found:
                raise FirewallError(f"ipset restore: {proc.stderr.strip() or 'failed'}")
            bad = int(found.group(1)) - 1
            if not 0 <= bad < len(pending):
                raise FirewallError(f"ipset restore: {proc.stderr.strip()}")
            result.done += bad
            line, target = pending[bad]
            rest = pending[bad + 1:]
            if "is full" in found.group(2):
                set_name = line.split()[1]
                present = self._members(set_name)
                refused = [target]
                keep = []
                for ln, t in rest:
                    if ln.startswith(f"add {set_name} ") and _net(ln.split()[2]) not in present:
                        refused.append(t)
                    else:
                        keep.append((ln, t))
                full.setdefault(set_name, []).extend(refused)
                rest = keep
            else:
                result.refuse(target, found.group(2).strip())
            pending = rest
            if not pending:
                break
        for set_name, refused in full.items():
            text = f"{FULL_TEXT} ({set_name}, maxelem {self.options.maxelem}): " \
                   f"{len(refused)} entries refused"
            result.failed.extend(Failure(t, text, SET_FULL) for t in refused)

    def _members(self, set_name: str) -> set[ipaddress.IPv4Network | ipaddress.IPv6Network | str]:
        """A set's elements as networks, so "198.18.0.1" and "198.18.0.1/32" compare equal."""
        return {_net(listed.target) for listed in self._list_set(set_name)}

    # ----------------------------------------------------------- reading
    def _set_names(self) -> set[str]:
        return set(_sh(["ipset", "list", "-n"]).stdout.split())

    @staticmethod
    def _headers() -> dict[str, dict[str, str]]:
        return ipsettext.parse_headers(_sh(["ipset", "list", "-t"]).stdout)

    def _list_set(self, name: str) -> Iterable[Listed]:
        return ipsettext.parse_saved(_sh(["ipset", "list", "-o", "save", name]).stdout)

    def list(self) -> list[Listed]:
        return [x for name in self.sets.values() for x in self._list_set(name)]

    def entry_counts(self) -> dict[int, int]:
        """Elements per family from the set headers (the kernel's count; entries that
        timed out but are not yet garbage-collected are still in it)."""
        headers = self._headers()
        return {f: int(headers.get(name, {}).get("Number of entries", 0) or 0)
                for f, name in self.sets.items()}

    def counters(self) -> dict[int, Counters]:
        """Drops by our rules (rules mode): ``connections`` is the counter of the rule
        that drops a SYN not seen before, ``packets`` adds the retransmits' rule.  A
        chain of an older rblguard (one plain DROP rule) counts every SYN as a
        connection until ``ensure`` refills it."""
        result = {}
        for family, tool in _TOOLS.items():
            packets = connections = 0
            seen = self.seen[family]
            proc = _sh([tool, "-w", "-L", self.options.chain, "-v", "-x", "-n"], check=False)
            for line in proc.stdout.splitlines():
                parts = line.split()
                if len(parts) > 2 and parts[2] == "DROP" and "match-set" in parts:
                    n = int(parts[0])
                    packets += n
                    if seen not in parts:
                        connections += n
            result[family] = Counters(packets=packets, connections=connections)
        return result

    def health(self) -> Health:
        """Sets (present, of the right type and family) from their headers, and in rules
        mode the chain, its rules and the jump: no element is read."""
        problems: list[str] = []
        try:
            headers = self._headers()
        except FirewallError as exc:
            return Health(False, [str(exc)])
        wanted = [(self.sets[f], "hash:net", fam) for f, fam in IPSET_FAMILIES]
        if self.options.mode == "rules":
            wanted += [(self.seen[f], "hash:ip,port", fam)
                       for f, fam in IPSET_FAMILIES]
        for name, kind, fam in wanted:
            header = headers.get(name)
            if header is None:
                problems.append(f"ipset {name} is missing")
            elif (header.get("Type") != kind
                  or f"family {fam} " not in header.get("Header", "") + " "):
                problems.append(f"ipset {name} is {header.get('Type')} "
                                f"({header.get('Header', '').split(' hashsize')[0]}), "
                                f"expected {kind} family {fam}")
        if self.options.mode == "rules":
            chain = self.options.chain
            for family, tool in _TOOLS.items():
                if _sh([tool, "-w", "-S", chain], check=False).returncode != 0:
                    problems.append(f"{tool} chain {chain} is missing")
                    continue
                if not self._has(tool, "INPUT", ["-j", chain]):
                    problems.append(f"{tool}: INPUT does not jump to {chain}")
                for spec in self.rule_specs(family):
                    if not self._has(tool, chain, spec):
                        problems.append(f"{tool}: rule missing in {chain}: {' '.join(spec)}")
        return Health(not problems, problems)

    def close(self) -> None:
        if self._nl is not None:
            try:
                self._nl.close()
            finally:
                self._nl = None
