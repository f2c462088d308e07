"""Metrics: what observe_chunk and the small methods count, the kernel counters' resets,
the DNSBL budget, and the endpoint as promtool and a real Prometheus server see it.

``prometheus_server()`` below is a reusable helper: it starts /usr/bin/prometheus with
a temporary config and storage, scraping the given targets every second on loopback,
so the same checks can later be pointed at a running ``rblguard run``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rblguard.daemon.listen import MetricsAddressError, parse_address
from rblguard.daemon.metrics import Metrics
from rblguard.firewall.base import Counters
from rblguard.fleet.metrics import FleetMetrics
from rblguard.model import ChunkResult, Connection, Ignored, Match, ParseError
from tests.netns import require_root_tools


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fetch(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


_FETCH = ("import sys, urllib.request\n"
          "with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:\n"
          "    sys.stdout.write(r.read().decode())\n")


def netns_fetch(ns: str) -> Callable[..., str]:
    """fetch() from inside network namespace ``ns`` (a loopback there is its own)."""
    def fetch_in(url: str, timeout: float = 5) -> str:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _FETCH, url,
                               str(timeout)], capture_output=True, text=True,
                              timeout=timeout + 10)
        if proc.returncode != 0:
            raise OSError(f"GET {url} in {ns}: {proc.stderr.strip()[-300:]}")
        return proc.stdout
    return fetch_in


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ignored(rule: str, reason: str, kind: str, zone: str | None = None,
            line: str = "...") -> Ignored:
    return Ignored(rule=rule, reason=reason, kind=kind, zone=zone, address="198.18.0.9",
                   time=None, line=line, offset=0)


OPEN_RESOLVER = ("rblsmtpd: 203.0.113.77 pid 7120: 451 Error: open resolver; "
                 "https://check.spamhaus.org/returnc/pub/203.0.113.53/")
VOLUME = ("rblsmtpd: 203.0.113.78 pid 7121: 451 Error: excessive number of queries; "
          "https://check.spamhaus.org/returnc/vol/203.0.113.53/")
TYPO = "rblsmtpd: 203.0.113.79 pid 7122: 451 https://check.spamhaus.org/returnc/typo/zen.rog"


# -- counting ---------------------------------------------------------------------------


def test_observe_chunk_counts_every_event_kind() -> None:
    m = Metrics()
    events = [
        Match("spamhaus", "198.18.5.124", None, "l", 10),
        Match("spamhaus", "198.18.5.125", None, "l", 20),
        Match("spamcop", "2001:db8::17", None, "l", 30),
        Connection("198.18.5.124", None, 40),
        Connection("198.18.5.126", None, 50),
        ignored("spamhaus", "dnsbl-error", "dnsbl-error", "spamhaus.org", OPEN_RESOLVER),
        ignored("spamhaus", "dnsbl-error", "dnsbl-error", "spamhaus.org", OPEN_RESOLVER),
        ignored("spamcop", "returnc", "dnsbl-error", None, "rblsmtpd: 1.2.3.4 pid 1: 451 x"),
        ignored("spamhaus", "lookup-error", "lookup-error"),
        ignored("spamhaus", "greetdelay", "other"),
        ParseError("spamhaus", "rblsmtpd: 999.1.1.1 pid 1: 451 x", None, 60),
    ]
    m.observe_chunk("/var/log/qmail/smtpd/current", ChunkResult(lines=12, events=events))
    m.observe_chunk("/var/log/qmail/smtpd/current", ChunkResult(lines=3))
    assert sample(m, "rblguard_lines_read_total", source="/var/log/qmail/smtpd/current") == 15
    assert sample(m, "rblguard_matches_total", rule="spamhaus") == 2
    assert sample(m, "rblguard_matches_total", rule="spamcop") == 1
    assert sample(m, "rblguard_smtp_connections_total") == 2
    assert sample(m, "rblguard_dnsbl_error_replies_total", zone="spamhaus.org",
                  kind="open-resolver") == 2
    assert sample(m, "rblguard_dnsbl_error_replies_total", zone="unknown", kind="other") == 1
    assert sample(m, "rblguard_rbl_lookup_errors_total") == 1
    assert sample(m, "rblguard_ignored_lines_total", rule="spamhaus", reason="dnsbl-error") == 2
    assert sample(m, "rblguard_ignored_lines_total", rule="spamhaus", reason="greetdelay") == 1
    assert sample(m, "rblguard_parse_errors_total", rule="spamhaus") == 1
    assert m.matches_by_rule() == {"spamhaus": 2, "spamcop": 1}
    assert m.budget()["connections_seen_total"] == 2


@pytest.mark.parametrize(("text", "kind"), [
    (OPEN_RESOLVER, "open-resolver"),  # 127.255.255.254: query via a public/open resolver
    ("rblsmtpd: 203.0.113.77 pid 7120: 451 https://www.spamhaus.org/returnc/pub/198.51.100.9",
     "open-resolver"),
    (VOLUME, "volume"),  # 127.255.255.255: too many queries, the free-use cut-off
    ("rblsmtpd: 203.0.113.78 pid 7121: 553 Error: query volume too high; "
     "https://www.spamhaus.org/returnc/vol/", "volume"),
    (TYPO, "typo"),  # 127.255.255.252: a typo in the zone name
    ("rblsmtpd: 203.0.113.79 pid 7122: 451 Error: typing error in DNSBL name", "typo"),
    ("rblsmtpd: 203.0.113.80 pid 7123: 451 Error: something new; https://x.example/returnc/",
     "other"),
    ("rblsmtpd: 203.0.113.81 pid 7124: 451 Error: " + "z" * 5000, "other"),
    # postscreen's dnsblog shows the A record, and no TXT
    ("postfix/dnsblog: addr 198.18.5.127 listed by domain zen.spamhaus.org as "
     "127.255.255.254", "open-resolver"),
    ("postfix/dnsblog: addr 198.18.5.127 listed by domain zen.spamhaus.org as "
     "127.255.255.255", "volume"),
    ("postfix/dnsblog: addr 198.18.5.127 listed by domain zen.spamhaus.org as "
     "127.255.255.252", "typo"),
    ("postfix/dnsblog: addr 198.18.5.127 listed by domain zen.spamhaus.org as "
     "127.255.255.250", "other"),
])
def test_dnsbl_error_kind_says_what_happened(text: str, kind: str) -> None:
    from rblguard.daemon.metrics import DNSBL_ERROR_KINDS, dnsbl_error_kind

    assert dnsbl_error_kind(text) == kind
    m = Metrics()
    m.observe_chunk("s", ChunkResult(lines=1, events=[
        ignored("rblsmtpd", "dnsbl-error", "dnsbl-error", "spamhaus.org", text)]))
    assert sample(m, "rblguard_dnsbl_error_replies_total", zone="spamhaus.org",
                  kind=kind) == 1
    kinds = {s.labels["kind"] for f in m.registry.collect() for s in f.samples
             if s.name == "rblguard_dnsbl_error_replies_total"}
    assert kinds == {kind} and kinds <= set(DNSBL_ERROR_KINDS)  # a bounded label


def test_observe_chunk_counts_tally_results() -> None:
    """Scanner.tally() leaves counts instead of Match and Connection events."""
    m = Metrics()
    result = ChunkResult(lines=100, connection_count=40,
                         match_counts={("spamhaus", "198.18.0.1"): 3,
                                       ("spamhaus", "198.18.0.2"): 2,
                                       ("spamcop", "198.18.0.3"): 1},
                         events=[Connection("198.18.0.4", None, 1)])
    m.observe_chunk("s", result)
    assert sample(m, "rblguard_matches_total", rule="spamhaus") == 5
    assert sample(m, "rblguard_matches_total", rule="spamcop") == 1
    assert sample(m, "rblguard_smtp_connections_total") == 41


def test_small_methods() -> None:
    clock = FakeClock(1_700_000_000.0)
    m = Metrics(wall_clock=clock)
    m.ban("spamhaus", 4)
    m.ban("spamhaus", 6)
    m.ban("spamhaus", 6)
    m.refused("storm_rate")
    m.set_active({4: 17, 6: 3})
    m.ban_latency(0.003)
    m.ban_latency(0.2)
    m.source_lag("s", 4096)
    m.firewall_error("ban")
    m.firewall_health(False)
    m.reload(True)
    clock.t += 60
    m.reload(False)
    assert sample(m, "rblguard_bans_total", rule="spamhaus", family="ipv4") == 1
    assert sample(m, "rblguard_bans_total", rule="spamhaus", family="ipv6") == 2
    assert sample(m, "rblguard_bans_refused_total", reason="storm_rate") == 1
    assert sample(m, "rblguard_active_bans", family="ipv4") == 17
    assert sample(m, "rblguard_active_bans", family="ipv6") == 3
    assert sample(m, "rblguard_ban_latency_seconds_count") == 2
    assert sample(m, "rblguard_ban_latency_seconds_bucket", le="0.005") == 1
    assert sample(m, "rblguard_ban_latency_seconds_bucket", le="0.25") == 2
    assert sample(m, "rblguard_source_lag_bytes", source="s") == 4096
    assert sample(m, "rblguard_firewall_errors_total", operation="ban") == 1
    assert sample(m, "rblguard_firewall_healthy") == 0
    assert sample(m, "rblguard_rule_reloads_total", result="success") == 1
    assert sample(m, "rblguard_rule_reloads_total", result="failure") == 1
    assert sample(m, "rblguard_rule_reload_last_success_timestamp_seconds") == 1_700_000_000
    assert sample(m, "rblguard_rule_reload_last_failure_timestamp_seconds") == 1_700_000_060
    assert sample(m, "rblguard_housekeeping_last_run_timestamp_seconds") == 1_700_000_000


def test_alert_watched_label_sets_start_at_zero() -> None:
    """increase() needs a 0 before the first event, or the first refusal never alerts."""
    m = Metrics()
    for reason in ("allowlist", "storm_active", "storm_rate", "set_full"):
        assert sample(m, "rblguard_bans_refused_total", reason=reason) == 0
    assert sample(m, "rblguard_rule_reloads_total", result="failure") == 0
    for reason in ("manual", "allowlisted", "flush"):
        assert sample(m, "rblguard_unbans_total", reason=reason) == 0
    m.unbanned("flush", 3)
    assert sample(m, "rblguard_unbans_total", reason="flush") == 3
    assert sample(m, "rblguard_firewall_errors_total", operation="ban") == 0
    assert sample(m, "rblguard_firewall_healthy") == 1
    assert sample(m, "rblguard_build_info", version=__import__("rblguard").__version__) == 1


def test_kernel_counters_stay_monotonic_across_resets() -> None:
    m = Metrics(zones=3)
    m.set_kernel_counters({4: Counters(packets=50, connections=10),
                           6: Counters(packets=4, connections=1)})
    m.set_kernel_counters({4: Counters(packets=80, connections=16),
                           6: Counters(packets=4, connections=1)})
    # the firewall objects were recreated: the kernel counts from 0 again
    m.set_kernel_counters({4: Counters(packets=5, connections=2),
                           6: Counters(packets=0, connections=0)})
    assert sample(m, "rblguard_blocked_connections_total", family="ipv4") == 18
    assert sample(m, "rblguard_blocked_packets_total", family="ipv4") == 85
    assert sample(m, "rblguard_blocked_connections_total", family="ipv6") == 1
    m.set_kernel_counters({4: Counters(packets=9, connections=3),
                           6: Counters(packets=2, connections=1)})
    assert sample(m, "rblguard_blocked_connections_total", family="ipv4") == 19
    assert sample(m, "rblguard_blocked_connections_total", family="ipv6") == 2
    assert sample(m, "rblguard_dnsbl_queries_avoided_total") == 3 * (19 + 2)
    assert m.budget()["queries_avoided_total"] == 63


# -- DNSBL budget ----------------------------------------------------------------------


def connections(m: Metrics, n: int) -> None:
    m.observe_chunk("s", ChunkResult(lines=n, connection_count=n))


def test_budget_scales_the_last_hour_to_a_day() -> None:
    clock = FakeClock()
    m = Metrics(zones=2, connections_per_day=100_000, queries_per_day=300_000, clock=clock)
    # 2 connections a second for two hours, sampled as the daemon's housekeeping would
    for _ in range(720):
        clock.t += 10
        connections(m, 20)
        m.set_kernel_counters({})
    b = m.budget()
    assert b["connections_per_day_estimate"] == pytest.approx(2 * 86400, rel=0.01)
    assert b["queries_per_day_estimate"] == pytest.approx(4 * 86400, rel=0.01)
    assert b["connections_per_day_limit"] == 100_000
    assert b["queries_per_day_limit"] == 300_000
    assert sample(m, "rblguard_dnsbl_queries_per_day_estimate") == pytest.approx(
        4 * 86400, rel=0.01)
    assert sample(m, "rblguard_dnsbl_queries_per_day_limit") == 300_000
    assert sample(m, "rblguard_dnsbl_connections_per_day_limit") == 100_000
    # then quiet for an hour: the hour-long window forgets the busy time
    for _ in range(370):
        clock.t += 10
        m.set_kernel_counters({})
    assert m.budget()["connections_per_day_estimate"] == 0
    assert len(m.window.samples) <= 3600 / 10 + 2


def test_budget_right_after_start_is_not_scaled_from_seconds() -> None:
    clock = FakeClock()
    m = Metrics(zones=1, clock=clock)
    clock.t += 1
    connections(m, 10)
    # 10 in one second would be 864,000 a day; over the 60 s minimum span it is 14,400
    assert m.budget()["connections_per_day_estimate"] == 14_400


# -- serving ----------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9731") == ("127.0.0.1", 9731)
    assert parse_address("[::1]:9731") == ("::1", 9731)
    assert parse_address(":9731") == ("::", 9731)
    with pytest.raises(MetricsAddressError):
        parse_address("localhost")


def test_serve_on_loopback_v4_and_v6_and_a_taken_port() -> None:
    m4, m6, other = Metrics(), Metrics(), Metrics()
    port4, port6 = free_port(), free_port("::1")
    m4.serve(f"127.0.0.1:{port4}")
    m6.serve(f"[::1]:{port6}")
    try:
        m4.set_active({4: 5, 6: 0})
        assert 'rblguard_active_bans{family="ipv4"} 5.0' in fetch(
            f"http://127.0.0.1:{port4}/metrics")
        assert "rblguard_build_info" in fetch(f"http://[::1]:{port6}/metrics")
        with pytest.raises(MetricsAddressError, match=rf"127\.0\.0\.1:{port4}.*taken"):
            other.serve(f"127.0.0.1:{port4}")
    finally:
        m4.close()
        m6.close()


def test_endpoint_passes_promtool_check_metrics() -> None:
    require_root_tools("promtool")
    m = busy_metrics()
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        text = fetch(f"http://127.0.0.1:{port}/metrics")
    finally:
        m.close()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rblguard_blocked_connections_total" in text


def busy_metrics() -> Metrics:
    """A Metrics object with every family of metric holding a value."""
    m = Metrics()
    m.observe_chunk("/var/log/qmail/smtpd/current", ChunkResult(lines=9, events=[
        Match("spamhaus", "198.18.5.124", None, "l", 1),
        Connection("198.18.5.124", None, 2),
        ignored("spamhaus", "dnsbl-error", "dnsbl-error", "spamhaus.org", OPEN_RESOLVER),
        ignored("spamhaus", "lookup-error", "lookup-error"),
        ParseError("spamhaus", "x", None, 3)]))
    m.ban("spamhaus", 4)
    m.refused("allowlist")
    m.set_active({4: 42, 6: 7})
    m.set_kernel_counters({4: Counters(30, 12), 6: Counters(3, 1)})
    m.ban_latency(0.004)
    m.source_lag("/var/log/qmail/smtpd/current", 0)
    m.firewall_error("health")
    m.reload(True)
    fleet = FleetMetrics(m.registry)  # a member of a fleet: its families too
    fleet.published.inc(3)
    fleet.applied.inc(5)
    fleet.refused.labels("too_wide").inc()
    fleet.queue.set(0)
    fleet.up.set(1)
    fleet.propagation.observe(0.004)
    fleet.quarantined.set(0)
    return m


# -- a real Prometheus server ------------------------------------------------------------


@dataclass
class PrometheusServer:
    """A running Prometheus, asked through its HTTP query API."""

    url: str
    process: subprocess.Popen[bytes]
    fetch: Callable[..., str] = fetch

    def query(self, expr: str) -> list[dict]:
        qs = urllib.parse.urlencode({"query": expr})
        body = json.loads(self.fetch(f"{self.url}/api/v1/query?{qs}"))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, expr: str, accept: Callable[[list[dict]], bool],
                 timeout: float = 20) -> list[dict]:
        """Query until ``accept`` likes the answer; fail with the last answer if never."""
        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                result = self.query(expr)
                if accept(result):
                    return result
            time.sleep(0.25)
        raise AssertionError(f"{expr}: no acceptable answer in {timeout} s; last {result}")


@contextlib.contextmanager
def prometheus_server(targets: list[str], workdir: Path, job: str = "rblguard",
                      rule_files: list[Path] | None = None,
                      netns: str | None = None) -> Iterator[PrometheusServer]:
    """Start /usr/bin/prometheus scraping ``targets`` (host:port) every second, on a
    free loopback port with temporary storage; stopped (and waited for) on exit.

    With ``netns`` it runs inside that network namespace (to scrape a daemon listening
    on the namespace's loopback), and its API is asked from inside it too."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    config = workdir / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML: no templating of a config by hand
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files or []],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
    }))
    port = free_port() if netns is None else 19090  # a new namespace has every port free
    log = (workdir / "prometheus.log").open("wb")
    wrap = ["ip", "netns", "exec", netns] if netns else []
    process = subprocess.Popen(
        [*wrap, binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", process,
                              netns_fetch(netns) if netns else fetch)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if "Ready" in server.fetch(f"{server.url}/-/ready", timeout=1):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prometheus did not start: "
                                   + (workdir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_real_prometheus_scrapes_the_values_set(tmp_path: Path) -> None:
    require_root_tools("prometheus")
    m = busy_metrics()
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        with prometheus_server([f"127.0.0.1:{port}"], tmp_path) as prom:
            prom.wait_for('up{job="rblguard"}', lambda r: bool(r) and r[0]["value"][1] == "1")
            result = prom.wait_for('rblguard_active_bans{family="ipv4"}', bool)
            assert result[0]["value"][1] == "42"
            m.set_active({4: 43, 6: 7})
            prom.wait_for('rblguard_active_bans{family="ipv4"}',
                          lambda r: bool(r) and r[0]["value"][1] == "43")
            avoided = prom.query("rblguard_dnsbl_queries_avoided_total")
            assert avoided[0]["value"][1] == str(2 * 13)
            limit = prom.query("rblguard_dnsbl_queries_per_day_limit")
            assert limit[0]["value"][1] == "300000"
    finally:
        m.close()


def test_active_bans_metric_is_exact_right_after_a_burst(log_harness, tmp_path: Path) -> None:
    """The gauge is computed at scrape time from the decider's counts: a scrape right
    after a burst shows every ban `rblguard status` shows, not the last 5 s round's."""
    from tests.daemon_harness import reject_message, tai64n, wait_for

    port = 19741
    log_harness.write_config(metrics=f"127.0.0.1:{port}")
    log_harness.start()
    fetch_in = netns_fetch(log_harness.ns)
    url = f"http://127.0.0.1:{port}/metrics"

    def scraped() -> dict[str, float]:
        text = fetch_in(url)
        return {family: float(value) for family, value in re.findall(
            r'^rblguard_active_bans\{family="(ipv[46])"\} (\S+)$', text, re.MULTILINE)}

    assert scraped() == {"ipv4": 0.0, "ipv6": 0.0}
    burst = [f"198.18.41.{i}" for i in range(1, 121)] + [f"2001:db8:41:{i}::9"
                                                         for i in range(1, 11)]
    with open(tmp_path / "log" / "current", "a") as log:
        log.write("".join(tai64n() + reject_message(a, i) for i, a in enumerate(burst)))

    def status() -> dict[str, int]:
        return log_harness.cli("status", "--json")["active_bans"]

    wait_for(lambda: sum(status().values()) == len(burst), what="the burst's bans")
    got = scraped()  # at once: the housekeeping round has most likely not run yet
    assert got == {"ipv4": 120.0, "ipv6": 10.0}
    assert {k: int(v) for k, v in got.items()} == status()
