"""A real qmail front end in two network namespaces, with rblguard beside it, measured.

Server namespace, built as a qmail run script builds it:

- dnsmasq is the DNSBL: zones ``zen.spamhaus.org`` and ``bl.spamcop.net`` answered only
  locally (no upstream, no cache), one TXT record per listed client, every query logged;
- ``tcpserver -v -H -R -l 0 -x tcp.smtp.cdb -c LIMIT`` runs ``rblsmtpd -b -r zen -b -r
  spamcop`` in front of a tiny SMTP stand-in (a shell script), and ``multilog t`` writes
  their log with a small size limit, so it rotates during the run;
- ``rblguard run`` follows that log and bans in nftables (or ipset with iptables rules);
- an nftables counter of its own counts every DNS query packet, to cross-check dnsmasq's
  log, and ``nft monitor`` stamps each ban as the kernel takes it.

Client namespace: tests.e2e.load plays a plan of SMTP connections from hundreds or
thousands of addresses.  Nothing stands in for a part; the only thing the test decides
is who is listed and when each client connects.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.daemon_harness import DaemonHarness, ElementMonitor, NotifyListener, wait_for
from tests.e2e import peers
from tests.e2e.load import Outcome, Planned
from tests.netns import NetnsPair, netns_pair, run

ZONES = ("zen.spamhaus.org", "bl.spamcop.net")
LEGIT_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
SPAM_NET = "198.19.0.0/16"
SMTP_PORT = 25
METRICS = "127.0.0.1:9731"
TAI64_UNIX_OFFSET = 4611686018427387914
STANDIN = r"""#!/bin/sh
# The SMTP stand-in behind rblsmtpd: accepts every command, as a real MTA accepts mail.
printf '220 standin.example.net ESMTP\r\n'
while read -r line; do
  case "$line" in
    QUIT*|quit*) printf '221 bye\r\n'; exit 0 ;;
    *) printf '250 ok\r\n' ;;
  esac
done
"""
TCP_SMTP = '127.:allow,RELAYCLIENT=""\n:allow\n'
# The lean follower of peers.md, for comparison only: ``tail -F`` and one ``nft`` process
# per reject (the least a swatch or fail2ban action costs), skipping the lines that must
# never ban, and dropping new connections only, like rblguard: only the process per ban
# differs.  Its table, ``inet e2eref``, is the front end's own.
REFERENCE_BANNER = r"""#!/bin/sh
tail -F -n +1 "$1" 2>/dev/null | while read -r stamp program address rest; do
  [ "$program" = "rblsmtpd:" ] || continue
  case "$rest" in
    *"temporary RBL lookup error"*|*"Error:"*|*"/returnc/"*) continue ;;
    "pid "*": 451 "*|"pid "*": 553 "*)
      nft add element inet e2eref v4 "{ ${address#::ffff:} timeout 3600s }" ;;
  esac
done
"""
REFERENCE_TABLE = """add table inet e2eref
add set inet e2eref v4 { type ipv4_addr; flags timeout; }
add counter inet e2eref blocked
add chain inet e2eref input { type filter hook input priority -10; }
add rule inet e2eref input tcp dport 25 ct state new ip saddr @v4 counter name "blocked" drop
"""
STAMPED = re.compile(r"^@([0-9a-f]{24}) (.*)$")
REJECT = re.compile(r"^rblsmtpd: (\S+) pid \d+: (?:451|553) ")
CONNECTION = re.compile(r"^tcpserver: pid \d+ from (\S+)$")
ENDED = re.compile(r"^tcpserver: end \d+ status \d+$")
STATUS = re.compile(r"^tcpserver: status: (\d+)/(\d+)$")


def tai64n_time(label: str) -> float:
    """Unix time of a 24-hex-digit TAI64N label (decoded here, not by rblguard)."""
    return int(label[:16], 16) - TAI64_UNIX_OFFSET + int(label[16:], 16) / 1e9


# -- who is who ------------------------------------------------------------------------

@dataclass(frozen=True)
class Population:
    """The clients: unlisted senders, and listed ones with the zone that lists them."""

    legit: list[str]
    spam: dict[str, int]  # address -> 1 (listed on zen) or 2 (only on spamcop)

    @classmethod
    def make(cls, seed: int, legit: int, spam: int, spamcop_share: float = 0.25) -> Population:
        rng = random.Random(seed)
        hosts = [f"{net.rsplit('.', 1)[0]}.{h}" for net in LEGIT_NETS for h in range(1, 255)]
        assert legit <= len(hosts) and spam <= 250 * 256
        spammers = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(spam)]
        return cls(legit=rng.sample(hosts, legit),
                   spam={a: 2 if rng.random() < spamcop_share else 1 for a in spammers})


def dnsbl_name(address: str, zone: str) -> str:
    """The name a DNSBL is asked about an IPv4 address: its octets reversed, then the
    zone (198.19.0.1 on zen: 1.0.19.198.zen.spamhaus.org)."""
    return ".".join(reversed(address.split("."))) + "." + zone


def txt_records(population: Population) -> list[str]:
    """dnsmasq ``txt-record`` lines: what each zone answers for its listed clients."""
    lines = []
    for address, zone in population.spam.items():
        name = dnsbl_name(address, ZONES[zone - 1])
        text = (f"https://www.spamhaus.org/query/ip/{address}" if zone == 1
                else f"Blocked - see https://www.spamcop.net/bl.shtml?{address}")
        lines.append(f'txt-record={name},"{text}"')
    return lines


def ideal_queries(plan: list[Planned], population: Population) -> int:
    """DNSBL queries with an instant ban: every legitimate connection asks every zone,
    each spammer's first connection asks the zones up to the one that lists it, and no
    retry of a spammer reaches rblsmtpd."""
    legit = sum(1 for p in plan if p.kind == "legit") * len(ZONES)
    return legit + sum(population.spam[a] for a in {p.src for p in plan if p.kind == "spam"})


# -- what a run measured ---------------------------------------------------------------

@dataclass
class Measured:
    """Every figure of one run, from the parts themselves (none from rblguard's word)."""

    dns_queries: int  # TXT queries in dnsmasq's log
    dns_packets: int  # UDP packets to port 53, counted by the kernel
    ideal_queries: int
    outcomes: dict[str, int]  # "kind/outcome" -> count
    legit_failed: list[dict]
    banned: set[str]  # in the kernel at the end
    legit_banned: set[str]
    first_reject: dict[str, float]  # address -> log time of its first rblsmtpd reject
    rejects_logged: int
    connections_logged: int
    sessions_ended: int  # tcpserver "end N status S": sessions that finished
    listen_drops: int  # SYNs the server's kernel dropped with tcpserver's backlog full
    max_in_use: int  # highest tcpserver "status: N/LIMIT"
    limit: int
    blocked_connections: int  # the firewall's counter of new connections dropped
    # What that counter should say: nftables counts every dropped connection (keyed on
    # address, port and sequence number); ipset can key on address and port only, so a
    # port the client used again within 130 s counts as a retransmit (docs/firewall.md).
    expected_blocked: int
    ban_seen: dict[str, float]  # address -> when nft monitor saw its element (nftables)
    down: list[tuple[float, float]] = field(default_factory=list)  # (killed, ready again)
    log_files: int = 0

    @property
    def excess_queries(self) -> int:
        return self.dns_queries - self.ideal_queries

    @property
    def excess_pct(self) -> float:
        return 100.0 * self.excess_queries / self.ideal_queries

    def while_down(self, address: str) -> bool:
        """Whether this address's first reject came while rblguard was not running (or
        was in flight at the kill: rejected before it, banned only after the restart)."""
        rejected = self.first_reject[address]
        seen = self.ban_seen.get(address, math.inf)
        return any(killed <= rejected <= ready or (rejected < killed < seen)
                   for killed, ready in self.down)

    def latencies_ms(self) -> list[float]:
        """Reject (log stamp) to element in the kernel (nft monitor), while running."""
        return sorted((self.ban_seen[a] - t) * 1000 for a, t in self.first_reject.items()
                      if a in self.ban_seen and not self.while_down(a))

    def latency_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of latencies_ms() (0.5, 0.95; 1.0 is the max), in ms, or
        None if no ban was timed."""
        lat = self.latencies_ms()
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    def summary(self) -> dict:
        lat = self.latencies_ms()

        def q(p: float) -> float | None:
            value = self.latency_quantile(p)
            return round(value, 2) if value is not None else None

        return {
            "dns_queries": self.dns_queries, "dns_packets": self.dns_packets,
            "ideal_queries": self.ideal_queries, "excess_queries": self.excess_queries,
            "excess_pct": round(self.excess_pct, 3), "outcomes": self.outcomes,
            "legit_failed": len(self.legit_failed), "legit_banned": len(self.legit_banned),
            "banned": len(self.banned), "rejects_logged": self.rejects_logged,
            "connections_logged": self.connections_logged,
            "sessions_ended": self.sessions_ended, "listen_drops": self.listen_drops,
            "blocked_connections": self.blocked_connections,
            "expected_blocked": self.expected_blocked,
            "max_in_use": self.max_in_use, "limit": self.limit, "log_files": self.log_files,
            "latency_p50_ms": q(0.5), "latency_p95_ms": q(0.95), "latency_max_ms": q(1.0),
            "bans_timed": len(lat), "restarts": len(self.down),
        }


# -- the front end ---------------------------------------------------------------------

class Frontend:
    """The server side of one run; ``backend`` None runs no banner at all (baseline)."""

    def __init__(self, pair: NetnsPair, workdir: Path, population: Population, *,
                 backend: str | None = "nftables", limit: int = 200,
                 log_size: int = 50_000, fleet: dict | None = None) -> None:
        self.pair = pair
        self.fleet = fleet  # rblguard's fleet: block (tests/e2e/fleet.py), if any
        self.workdir = workdir
        self.population = population
        self.backend = backend
        self.limit = limit
        self.log_size = log_size
        self.logdir = workdir / "log"
        self.procs: list[subprocess.Popen] = []
        self.daemon: DaemonHarness | None = None
        self.monitor: ElementMonitor | None = None
        self.notify: NotifyListener | None = None
        self.down: list[tuple[float, float]] = []
        self.peer: subprocess.Popen | None = None  # swatch or fail2ban, when one runs

    # -- start --------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pair = self.pair
        pair.add_client_addresses([*self.population.legit, *self.population.spam])
        pair.route_to_client([*LEGIT_NETS, SPAM_NET])
        self._count_dns_packets()
        self._start_dnsmasq()
        self._start_smtp()
        if self.backend == "process-per-ban":
            self._start_reference_banner()
        elif self.backend in ("swatch", "fail2ban"):
            self._start_peer()
        elif self.backend is not None:
            self._start_rblguard()

    def _server(self, cmd: list[str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.pair.server, *cmd],
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def _count_dns_packets(self) -> None:
        run(["ip", "netns", "exec", self.pair.server, "nft", "-f", "-"], input=(
            "add table inet e2ecount\n"
            "add counter inet e2ecount dns\n"
            "add chain inet e2ecount out { type filter hook output priority 0; }\n"
            'add rule inet e2ecount out udp dport 53 counter name "dns"\n'))

    def _start_dnsmasq(self) -> None:
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join([
            "port=53", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv",
            "no-hosts", "no-poll", "cache-size=0", "log-queries",
            f"log-facility={self.workdir / 'dns.log'}", "user=root",
            *(f"local=/{zone}/" for zone in ZONES), *self.dns_records()]) + "\n")
        self._server(["dnsmasq", "--keep-in-foreground", "-C", str(conf)],
                     stderr=open(self.workdir / "dnsmasq.err", "wb"))  # noqa: SIM115
        self._wait(lambda: "using only locally-known" in self._read("dns.log"),
                   "dnsmasq to start")

    def dns_records(self) -> list[str]:
        """dnsmasq's records of the listed clients: what the DNSBL answers."""
        return txt_records(self.population)

    def _start_smtp(self) -> None:
        standin = self.workdir / "standin"
        standin.write_text(STANDIN)
        standin.chmod(0o755)
        (self.workdir / "tcp.smtp").write_text(TCP_SMTP)
        run(["tcprules", str(self.workdir / "tcp.smtp.cdb"), str(self.workdir / "tcp.tmp")],
            input=TCP_SMTP)
        script = (
            f"cd {self.workdir} && exec env DNSCACHEIP=127.0.0.1 "
            f"tcpserver -v -H -R -l 0 -x tcp.smtp.cdb -c {self.limit} "
            f"{self.pair.server4} {SMTP_PORT} "
            f"rblsmtpd -b -r {ZONES[0]} -b -r {ZONES[1]} ./standin 2>&1 "
            f"| multilog t s{self.log_size} n999 ./log")
        self._server(["sh", "-c", script])
        self._wait(lambda: (self.logdir / "current").exists() and self._listening(),
                   "tcpserver and multilog to start")

    def _listening(self) -> bool:
        out = run(["ip", "netns", "exec", self.pair.server, "ss", "-Hltn",
                   f"sport = :{SMTP_PORT}"], check=False).stdout
        return bool(out.strip())

    def _start_rblguard(self) -> None:
        daemon_dir = self.workdir / "rblguard"
        (daemon_dir / "rules.d").mkdir(parents=True)
        self.daemon = DaemonHarness(daemon_dir, self.pair.server)
        backend = ("nftables" if self.backend == "nftables"
                   else {"type": "ipset", "mode": "rules"})
        self.daemon.write_config(sources=[{"path": str(self.logdir)}], backend=backend,
                                 ban_time="1h", metrics=METRICS,
                                 tcprules=str(self.workdir / "tcp.smtp"),
                                 dnsbl={"zones": len(ZONES)},
                                 **({"fleet": self.fleet} if self.fleet else {}))
        if self.backend == "nftables":
            self.monitor = ElementMonitor(self.pair.server)
        self.notify = NotifyListener(self.workdir / "notify.sock")
        self.daemon.start(env=self.notify.env)

    def _start_reference_banner(self) -> None:
        run(["ip", "netns", "exec", self.pair.server, "nft", "-f", "-"], input=REFERENCE_TABLE)
        script = self.workdir / "reference-banner"
        script.write_text(REFERENCE_BANNER)
        script.chmod(0o755)
        self.monitor = ElementMonitor(self.pair.server, table="e2eref")
        self._server([str(script), str(self.logdir / "current")])

    def _start_peer(self) -> None:
        """swatch or fail2ban instead of rblguard (tests/e2e/peers.py)."""
        workdir = self.workdir / self.backend
        workdir.mkdir()
        name = peers.SWATCH_SET if self.backend == "swatch" else peers.F2B_SET
        peers.drop_set_members(self.pair.server, name, SMTP_PORT)
        command = (peers.swatch_command if self.backend == "swatch"
                   else peers.fail2ban_command)(workdir, self.logdir / "current")
        self.peer = self._server(command, stdout=subprocess.DEVNULL,
                                 stderr=open(workdir / "stderr", "wb"))  # noqa: SIM115
        if self.backend == "fail2ban":
            self._wait(lambda: (workdir / "fail2ban.sock").exists(), "fail2ban to start")
        else:
            peer = self.peer
            self._wait(lambda: peers.running(peer.pid, "tail"), "swatch's tail to start")

    # -- during a run ---------------------------------------------------------------------

    def kill_and_restart(self) -> tuple[float, float]:
        """SIGKILL rblguard and start it again at once; (killed, ready) Unix times."""
        assert self.daemon is not None and self.notify is not None
        before = len(self.notify.ready_times())
        killed = time.time()
        self.daemon.kill(signal.SIGKILL)
        self.daemon.start(wait=False, env=self.notify.env)
        self._wait(lambda: len(self.notify.ready_times()) > before, "rblguard to be ready",
                   timeout=30)
        ready = self.notify.ready_times()[-1]
        self.down.append((killed, ready))
        return killed, ready

    def play(self, plan: list[Planned], during: Callable[[float], None] | None = None,
             lead: float = 1.0) -> list[Outcome]:
        """Play ``plan`` from the client namespace, starting ``lead`` s from now; while it
        runs, ``during(t0)`` (if given) may act on the server.  Returns every outcome."""
        t0 = time.time() + lead
        spec = self.workdir / f"plan-{int(t0)}.json"
        results = self.workdir / f"results-{int(t0)}.json"
        spec.write_text(json.dumps({"server": self.pair.server4, "port": SMTP_PORT, "t0": t0,
                                    "connections": [asdict(p) for p in plan]}))
        root = Path(__file__).resolve().parents[2]
        client = subprocess.Popen(["ip", "netns", "exec", self.pair.client, sys.executable,
                                   "-m", "tests.e2e.load", str(spec), str(results)],
                                  cwd=root, start_new_session=True)
        self.procs.append(client)
        if during is not None:
            during(t0)
        seconds = max((p.at for p in plan), default=0) + lead + 60
        if client.wait(seconds) != 0:
            raise RuntimeError(f"the load generator exited {client.returncode}")
        return [Outcome(**o) for o in json.loads(results.read_text())]

    # -- after a run ------------------------------------------------------------------------

    def _settled(self, rejected: int) -> bool:
        """The log holds every reject a client saw (rblsmtpd logs before it answers)
        and every session's end, and the daemon has read all of it."""
        text = "".join(p.read_text(errors="replace") for p in
                       [*sorted(self.logdir.glob("@*")), self.logdir / "current"])
        if text.count(" rblsmtpd: ") < rejected:
            return False
        # swatch's and fail2ban's rules drop every packet of a banned client, so its
        # sessions under way may never end; rblguard drops new connections only
        if (self.backend not in ("swatch", "fail2ban")
                and text.count("tcpserver: pid ") != text.count("tcpserver: end ")):
            return False
        status = self.daemon.cli("status", "--json") if self.daemon else None
        return status is None or all(s["lag_bytes"] == 0 for s in status["sources"])

    def measure(self, plan: list[Planned], outcomes: list[Outcome]) -> Measured:
        rejected = sum(o.outcome == "rejected" for o in outcomes)
        self._wait(lambda: self._settled(rejected),
                   "the last lines through multilog and the daemon")
        first_reject: dict[str, float] = {}
        rejects = connections = ended = max_in_use = files = 0
        for path in [*sorted(self.logdir.glob("@*")), self.logdir / "current"]:
            files += 1
            for raw in path.read_text(errors="replace").splitlines():
                m = STAMPED.match(raw)
                if not m:
                    continue
                stamp, message = m.groups()
                if r := REJECT.match(message):
                    rejects += 1
                    first_reject.setdefault(r.group(1), tai64n_time(stamp))
                elif CONNECTION.match(message):
                    connections += 1
                elif ENDED.match(message):
                    ended += 1
                elif s := STATUS.match(message):
                    max_in_use = max(max_in_use, int(s.group(1)))
        counts = Counter(f"{o.kind}/{o.outcome}" for o in outcomes)
        banned, blocked = self._kernel_bans_and_blocked()
        legit = set(self.population.legit)
        return Measured(
            dns_queries=self._read("dns.log").count(" query[TXT] "),
            dns_packets=self._dns_packets(), ideal_queries=ideal_queries(plan, self.population),
            outcomes=dict(sorted(counts.items())),
            legit_failed=[asdict(o) for o in outcomes
                          if o.kind == "legit" and o.outcome != "accepted"],
            banned=banned, legit_banned={b for b in banned if b in legit},
            first_reject=first_reject, rejects_logged=rejects, connections_logged=connections,
            sessions_ended=ended, listen_drops=self._listen_drops(),
            max_in_use=max_in_use, limit=self.limit, blocked_connections=blocked,
            expected_blocked=self._expected_blocked(outcomes),
            ban_seen=dict(self.monitor.seen) if self.monitor else {},
            down=list(self.down), log_files=files)

    def _expected_blocked(self, outcomes: list[Outcome]) -> int:
        dropped = [o for o in outcomes if o.outcome == "dropped"]
        if self.backend == "ipset":
            return len({(o.src, o.port) for o in dropped})
        return len(dropped)

    def _listen_drops(self) -> int:
        out = run(["ip", "netns", "exec", self.pair.server, "nstat", "-asz",
                   "TcpExtListenDrops"]).stdout
        return sum(int(ln.split()[1]) for ln in out.splitlines()
                   if ln.startswith("TcpExtListenDrops"))

    def _dns_packets(self) -> int:
        out = run(["ip", "netns", "exec", self.pair.server, "nft", "-j", "list", "counter",
                   "inet", "e2ecount", "dns"]).stdout
        return next(i["counter"]["packets"] for i in json.loads(out)["nftables"]
                    if "counter" in i)

    def _kernel_bans_and_blocked(self) -> tuple[set[str], int]:
        if self.backend == "process-per-ban":
            out = json.loads(run(["ip", "netns", "exec", self.pair.server, "nft", "-j",
                                  "list", "table", "inet", "e2eref"]).stdout)["nftables"]
            banned = {e["elem"]["val"] if isinstance(e, dict) else e for i in out
                      for e in i.get("set", {}).get("elem", [])}
            blocked = sum(i["counter"]["packets"] for i in out if "counter" in i)
            return banned, blocked
        if self.backend in ("swatch", "fail2ban"):
            name = peers.SWATCH_SET if self.backend == "swatch" else peers.F2B_SET
            return peers.set_members(self.pair.server, name), 0
        if self.daemon is None:
            return set(), 0
        status = self.daemon.cli("status", "--json")
        blocked = sum(c["connections"] for c in status["counters"].values())
        if self.backend == "nftables":
            return self.daemon.kernel_elements(), blocked
        members = set()
        for name in ("rblguard4", "rblguard6"):
            out = run(["ip", "netns", "exec", self.pair.server, "ipset", "list", name,
                       "-o", "save"], check=False).stdout
            members |= {ln.split()[2] for ln in out.splitlines() if ln.startswith("add ")}
        return members, blocked

    def simulate(self, ban_time: str = "1h") -> dict:
        """``rblguard simulate`` on this front end's log, as its one JSON object."""
        out = subprocess.run([sys.executable, "-m", "rblguard", "simulate", "--ban-time",
                              ban_time, "--zones", ",".join(ZONES), "--json",
                              str(self.logdir)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    def ban_latency_histogram(self) -> dict[float, float]:
        """rblguard's own ban latency histogram (le -> cumulative count), from /metrics."""
        out = run(["ip", "netns", "exec", self.pair.server, sys.executable, "-c",
                   f"import urllib.request; print(urllib.request.urlopen("
                   f"'http://{METRICS}/metrics').read().decode())"]).stdout
        buckets = {}
        for m in re.finditer(r'^rblguard_ban_latency_seconds_bucket\{le="([^"]+)"\} (\S+)$',
                             out, re.MULTILINE):
            buckets[float(m.group(1))] = float(m.group(2))
        return buckets

    # -- plumbing ---------------------------------------------------------------------------

    def _read(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
        wait_for(predicate, timeout, what, every=0.02)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.stop()
        if self.daemon is not None:
            self.daemon.kill(signal.SIGTERM)
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self.notify is not None:
            self.notify.close()


F = TypeVar("F", bound=Frontend)


@contextlib.contextmanager
def started(kind: type[F], prefix: str, workdir: Path, population: Population,
            **kwargs) -> Iterator[F]:
    """A started front end of ``kind`` in namespaces of its own (named ``prefix``-...),
    always torn down afterwards."""
    with netns_pair(prefix) as pair:
        fe = kind(pair, workdir, population, **kwargs)
        try:
            fe.start()
            yield fe
        finally:
            fe.close()


def frontend(workdir: Path, population: Population,
             **kwargs) -> contextlib.AbstractContextManager[Frontend]:
    """A started qmail front end (see started())."""
    return started(Frontend, "e2e", workdir, population, **kwargs)

