"""A real Postfix front end (Debian's ``postfix`` package) in the server namespace.

The same two namespaces, DNSBL, clients and rblguard as tests/e2e/frontend.py, with
Postfix instead of tcpserver + rblsmtpd: a configuration directory of the test's own
(``postfix -c DIR start-fg``, no file of the machine's Postfix read or written), its
queue and data in a directory of its own, and its log written by postlogd to a file
(``maillog_file``, Postfix 3.4 and later: no syslog).  The resolver Postfix asks is the
test's dnsmasq: /etc/resolv.conf is bind-mounted in a mount namespace of Postfix's own,
so nothing outside the test changes.

Two ways an admin points Postfix at a DNSBL:

- ``smtpd``: ``reject_rbl_client`` for each zone in ``smtpd_client_restrictions``
  (evaluated at RCPT): smtpd asks each zone's A record in order until one lists the
  client, then that zone's TXT record for the reply text;
- ``postscreen``: postscreen in front of smtpd with ``postscreen_dnsbl_sites`` (both
  zones asked at once, through dnsblog) and ``postscreen_dnsbl_action = enforce``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, OrderedDict, defaultdict
from dataclasses import asdict
from pathlib import Path

from tests.daemon_harness import DaemonHarness, ElementMonitor, NotifyListener
from tests.e2e.frontend import METRICS, ZONES, Frontend, Measured, Population, dnsbl_name, started
from tests.e2e.load import Outcome, Planned

MASTER_CF = """\
{smtp_service}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""
SMTPD_SERVICE = "smtp      inet  n       -       n       -       -       smtpd"
POSTSCREEN_SERVICES = """\
smtp      inet  n       -       n       -       1       postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog"""
CONNECT = re.compile(r" postfix/smtpd\[(\d+)\]: connect from \S*?\[([^\]]+)\]$", re.M)
DISCONNECT = re.compile(r" postfix/smtpd\[\d+\]: disconnect from ")
PS_CONNECT = re.compile(r" postfix/postscreen\[\d+\]: CONNECT from \[([^\]]+)\]:")
REJECT = re.compile(r": NOQUEUE: reject: RCPT from \S*?\[([^\]]+)\](?::\d+)?: \d{3} \S+ "
                    r"Service unavailable; [Cc]lient (?:host )?\[[^\]]+\] blocked using (\S+);")
ZONE_QUERY = re.compile(r" query\[(?:A|TXT)\] \S+\.(?:" + "|".join(map(re.escape, ZONES))
                        + r") from ")


RBL_CACHE = 100  # smtpd_check.c: ctable_create(100, rbl_pagein, ...), least recently used out


def _rbl_lookup(cache: OrderedDict[str, None], name: str, listed: bool) -> int:
    """The DNS queries smtpd makes for one DNSBL name with this process's ``cache``
    (ctable: a hit moves to the front, a miss when full drops the least recently used):
    none on a hit; on a miss the A record, and the TXT record if it is listed."""
    if name in cache:
        cache.move_to_end(name)
        return 0
    cache[name] = None
    if len(cache) > RBL_CACHE:
        cache.popitem(last=False)
    return 2 if listed else 1


def main_cf(base: Path, listen: str, postscreen: bool) -> str:
    """Postfix's main.cf: the test's directories, the DNSBL checks, nothing else."""
    rbl = ", ".join(f"reject_rbl_client {zone}" for zone in ZONES)
    lines = [
        "compatibility_level = 3.6",
        f"queue_directory = {base / 'queue'}", f"data_directory = {base / 'data'}",
        "command_directory = /usr/sbin", "daemon_directory = /usr/lib/postfix/sbin",
        "meta_directory = /etc/postfix", "shlib_directory = /usr/lib/postfix",
        "mail_owner = postfix", "setgid_group = postdrop",
        "myhostname = mx.example.net", "mydestination = example.net",
        "local_recipient_maps =", "alias_maps =", "alias_database =", "biff = no",
        "mynetworks = 127.0.0.0/8", f"inet_interfaces = {listen}", "inet_protocols = ipv4",
        f"maillog_file = {base / 'maillog'}", f"maillog_file_prefixes = {base}",
        # no PTR lookups: every DNS query the server makes is then a DNSBL query
        "smtpd_peername_lookup = no",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        "default_process_limit = 300",
    ]
    if postscreen:
        lines += [f"postscreen_dnsbl_sites = {', '.join(ZONES)}",
                  "postscreen_dnsbl_threshold = 1", "postscreen_dnsbl_action = enforce",
                  "postscreen_greet_banner =", "postscreen_greet_wait = 3s",
                  "postscreen_access_list = permit_mynetworks"]
    else:
        lines.append(f"smtpd_client_restrictions = {rbl}")
    return "\n".join(lines) + "\n"


ERROR_TEXT = "Error: open resolver; https://check.spamhaus.org/returnc/pub/198.18.0.1/"


def dnsbl_records(population: Population, erred: list[str]) -> list[str]:
    """dnsmasq lines: an A record (127.0.0.2, "listed") per listed client, which Postfix
    asks first (the TXT records for the reply text are the qmail front end's); and for
    each ``erred`` client Spamhaus' error reply, 127.255.255.254 with its text."""
    lines = []
    for address, zone in population.spam.items():
        name = dnsbl_name(address, ZONES[zone - 1])
        lines.append(f"host-record={name},127.0.0.2")
    for address in erred:
        name = dnsbl_name(address, ZONES[0])
        lines += [f"host-record={name},127.255.255.254", f'txt-record={name},"{ERROR_TEXT}"']
    return lines


class PostfixFrontend(Frontend):
    """Frontend with Postfix in place of tcpserver + rblsmtpd (``backend`` as there)."""

    def __init__(self, *args, postscreen: bool = False, erred: list[str] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.postscreen = postscreen
        self.erred = erred or []  # clients the DNSBL answers with an error reply
        # Postfix's unprivileged daemons reach their data directory by its full path:
        # it cannot live below pytest's root-only temporary directory.
        self.base = Path(tempfile.mkdtemp(prefix="rblguard-postfix-"))
        self.base.chmod(0o755)
        self.maillog = self.base / "maillog"

    def dns_records(self) -> list[str]:
        return [*super().dns_records(), *dnsbl_records(self.population, self.erred)]

    def _start_smtp(self) -> None:
        if self.erred:
            self.pair.add_client_addresses(self.erred)
        conf = self.base / "conf"
        for sub in ("conf", "queue", "data"):
            (self.base / sub).mkdir()
        shutil.chown(self.base / "data", "postfix")
        (conf / "main.cf").write_text(main_cf(self.base, self.pair.server4, self.postscreen))
        services = POSTSCREEN_SERVICES if self.postscreen else SMTPD_SERVICE
        (conf / "master.cf").write_text(MASTER_CF.format(smtp_service=services))
        (self.base / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        script = (f"mount --bind {self.base / 'resolv.conf'} /etc/resolv.conf && "
                  f"exec postfix -c {conf} start-fg")
        self._server(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                     stdout=open(self.workdir / "postfix.out", "wb"),  # noqa: SIM115
                     stderr=subprocess.STDOUT)
        self._wait(lambda: "daemon started" in self._read_maillog() and self._listening(),
                   "Postfix to start", timeout=30)

    def _start_rblguard(self) -> None:
        daemon_dir = self.workdir / "rblguard"
        (daemon_dir / "rules.d").mkdir(parents=True)
        self.daemon = DaemonHarness(daemon_dir, self.pair.server)
        self.daemon.write_config(sources=[{"path": str(self.maillog)}], backend="nftables",
                                 ban_time="1h", metrics=METRICS, packs=["postfix"],
                                 dnsbl={"zones": len(ZONES)})
        self.monitor = ElementMonitor(self.pair.server)
        self.notify = NotifyListener(self.workdir / "notify.sock")
        self.daemon.start(env=self.notify.env)

    def _read_maillog(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    # -- after a run ----------------------------------------------------------------------

    def _settled(self, rejected: int) -> bool:
        text = self._read_maillog()
        if len(REJECT.findall(text)) < rejected:
            return False
        if len(CONNECT.findall(text)) != len(DISCONNECT.findall(text)):
            return False
        status = self.daemon.cli("status", "--json") if self.daemon else None
        return status is None or all(s["lag_bytes"] == 0 for s in status["sources"])

    def measure(self, plan: list[Planned], outcomes: list[Outcome]) -> Measured:
        rejected = sum(o.outcome == "rejected" for o in outcomes)
        self._wait(lambda: self._settled(rejected), "the last lines through Postfix's log")
        text = self._read_maillog()
        # who was rejected comes from Postfix's log; when, from the client's clock: the
        # log's stamps have whole seconds only, which would add 0-1 s to every latency
        answered: dict[str, float] = {}
        for o in sorted(outcomes, key=lambda o: o.replied):
            if o.outcome == "rejected":
                answered.setdefault(o.src, o.replied)
        first_reject: dict[str, float] = {}
        for line in text.splitlines():
            if r := REJECT.search(line):
                address = r.group(1)
                first_reject.setdefault(address, answered.get(address)
                                        or self._line_time(line))
        counts = Counter(f"{o.kind}/{o.outcome}" for o in outcomes)
        banned, blocked = self._kernel_bans_and_blocked()
        legit = set(self.population.legit)
        connects = len((PS_CONNECT if self.postscreen else CONNECT).findall(text))
        return Measured(
            dns_queries=len(ZONE_QUERY.findall(self._read("dns.log"))),
            dns_packets=self._dns_packets(), ideal_queries=self.ideal_queries(plan, text),
            outcomes=dict(sorted(counts.items())),
            legit_failed=[asdict(o) for o in outcomes
                          if o.kind == "legit" and o.outcome != "accepted"],
            banned=banned, legit_banned={b for b in banned if b in legit},
            first_reject=first_reject, rejects_logged=len(REJECT.findall(text)),
            connections_logged=connects,
            sessions_ended=len(DISCONNECT.findall(text)), listen_drops=self._listen_drops(),
            max_in_use=0, limit=self.limit, blocked_connections=blocked,
            expected_blocked=self._expected_blocked(outcomes),
            ban_seen=dict(self.monitor.seen) if self.monitor else {},
            down=list(self.down), log_files=1)

    def ideal_queries(self, plan: list[Planned], text: str) -> int:
        """An instant banner's DNSBL queries, with Postfix's own caches counted as the
        run used them (so the figure is exact, not an upper bound):

        - smtpd: each smtpd process keeps its last ``RBL_CACHE`` DNSBL answers
          (smtpd_check.c's rbl cache), so a connection asks a zone only where its
          process has not asked it lately; a listed client's zone answers A, then TXT
          for the text.  The log's connections are replayed through that cache, each
          spammer's first only (an instant ban keeps its retries out);
        - postscreen: each client not in postscreen's cache asks every zone at once;
          a client that passed is cached (PASS OLD) and asks nothing.

        An ``erred`` client is never banned: each of its connections asks again (zen's
        A and TXT for smtpd, where its process's cache does not hold them; every zone
        for postscreen).
        """
        spammers = {p.src for p in plan if p.kind == "spam"}
        if self.postscreen:
            legit = {p.src for p in plan if p.kind == "legit"}
            erred = sum(p.kind == "erred" for p in plan)
            return len(ZONES) * (len(legit) + len(spammers) + erred)
        caches: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        met: set[str] = set()
        queries = 0
        for m in CONNECT.finditer(text):
            pid, address = m.groups()
            if address in spammers:
                if address in met:
                    continue
                listed = self.population.spam[address]  # the zone that lists it
            else:
                listed = 1 if address in self.erred else 0  # zen answers the error reply
            met.add(address)
            for number, zone in enumerate(ZONES[:listed or len(ZONES)], 1):
                queries += _rbl_lookup(caches[pid], dnsbl_name(address, zone),
                                       listed=number == listed)
        return queries

    def _line_time(self, line: str) -> float:
        """Unix time of a maillog line's stamp (``Dec 07 09:26:57.123456`` or without
        the microseconds), in this year and the local time zone."""
        stamp = line[:15]
        seconds = time.mktime(time.strptime(f"{time.localtime().tm_year} {stamp}",
                                            "%Y %b %d %H:%M:%S"))
        frac = re.match(r"\.(\d+)", line[15:])
        return seconds + (float("0." + frac.group(1)) if frac else 0.0)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of rblguard's /metrics (0 if absent), read in the server namespace."""
        out = subprocess.run(["ip", "netns", "exec", self.pair.server, sys.executable, "-c",
                              f"import urllib.request; print(urllib.request.urlopen("
                              f"'http://{METRICS}/metrics').read().decode())"],
                             capture_output=True, text=True, check=True).stdout
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in out.splitlines():
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return 0.0

    def simulate(self, ban_time: str = "1h") -> dict:
        out = subprocess.run([sys.executable, "-m", "rblguard", "simulate", "--pack",
                              "postfix", "--ban-time", ban_time, "--zones", ",".join(ZONES),
                              "--json", str(self.maillog)], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    def close(self) -> None:
        super().close()
        if self.maillog.exists():  # kept with the test's other files, for a failure
            shutil.copy(self.maillog, self.workdir / "maillog")
        shutil.rmtree(self.base, ignore_errors=True)


def postfix_frontend(workdir: Path, population: Population,
                     **kwargs) -> contextlib.AbstractContextManager[PostfixFrontend]:
    """A started Postfix front end (see tests.e2e.frontend.started())."""
    return started(PostfixFrontend, "pf", workdir, population, **kwargs)

