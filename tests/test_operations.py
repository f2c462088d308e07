"""A running daemon's /metrics: checked by promtool, every family holding what a scripted
log and real connections from a banned client make it hold, and scraped by a real
Prometheus whose query API agrees with ``rblguard status``.

The daemon runs in the server namespace of a namespace pair (tests/netns.py), follows a
log a real multilog writes, and serves metrics on that namespace's loopback; banned
clients connect from the client namespace.  The alert rules (tests/test_alerts.py), the
dashboard (tests/test_dashboard.py) and the systemd unit (tests/test_systemd.py) have
their own real-tool checks.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import NetnsPair, netns_pair, require_root_tools

METRICS_PORT = 19731
ZONES = 3
V4, V4_OTHER = "198.18.1.10", "198.18.8.1"  # banned; V4 connects from the client namespace
V6 = "2001:db8:0:5::10"  # banned as its /64, connects from the client namespace
V6_BAN = "2001:db8:0:5::/64"

# What multilog gets (it adds the stamps) and what each line must count as.
SCRIPT = [
    f"tcpserver: pid 101 from {V4}",
    f"rblsmtpd: {V4} pid 101: 553 https://www.spamhaus.org/query/ip/{V4}",
    f"tcpserver: pid 102 from {V4_OTHER}",
    f"rblsmtpd: {V4_OTHER} pid 102: 451 https://www.spamhaus.org/query/ip/{V4_OTHER}",
    f"tcpserver: pid 103 from {V6}",
    f"rblsmtpd: {V6} pid 103: 553 https://www.spamhaus.org/query/ip/{V6}",
    "tcpserver: pid 104 from 192.0.2.8",
    "tcpserver: pid 105 from 192.0.2.9",
    "rblsmtpd: 192.0.2.9 pid 105: 451 temporary RBL lookup error",
    "tcpserver: pid 106 from 192.0.2.10",
    "rblsmtpd: 192.0.2.10 pid 106: 451 Error: open resolver; "
    "https://check.spamhaus.org/returnc/pub/203.0.113.53/",
    "rblsmtpd: 192.0.2.11 pid 107: 451 Error: excessive number of queries; "
    "https://check.spamhaus.org/returnc/vol/203.0.113.53/",
    "rblsmtpd: 192.0.2.12 pid 108: 451 https://check.spamhaus.org/returnc/typo/zen.spamhaus.rog",
    "rblsmtpd: 198.18.300.1 pid 109: 553 https://www.spamhaus.org/query/ip/198.18.300.1",
    "rblsmtpd: 198.51.100.7 pid 110: greetdelay: 15",
]
CONNECTIONS = sum(line.startswith("tcpserver: ") for line in SCRIPT)  # 6
# Connections a banned client makes from the client namespace after its ban.
BLOCKED = {"ipv4": 3, "ipv6": 2}


@dataclass
class Running:
    pair: NetnsPair
    harness: object  # tests.daemon_harness.DaemonHarness
    started: float

    def metrics_text(self) -> str:
        from tests.test_metrics import netns_fetch

        return netns_fetch(self.pair.server)(f"http://127.0.0.1:{METRICS_PORT}/metrics")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics: 'name{a="x",b="y"}' (labels sorted) -> value."""
        return parse_samples(self.metrics_text())

    def wait_metrics(self, accept: Callable[[dict[str, float]], bool],
                     timeout: float = 20) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            if accept(values) or time.monotonic() > deadline:
                return values
            time.sleep(0.25)


def parse_samples(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        key = m.group(1) + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
                            if labels else "")
        samples[key] = float(m.group(3))
    return samples


@contextlib.contextmanager
def running_daemon(tmp_path: Path) -> Iterator[Running]:
    """rblguard run in the server namespace, the scripted log read and its bans in the
    kernel; the client namespace holds V4 and V6."""
    from tests.daemon_harness import DaemonHarness
    from tests.multilog import Multilog

    with netns_pair("rgm") as pair:
        pair.add_client_addresses([V4, V6])
        (tmp_path / "rules.d").mkdir(exist_ok=True)
        harness = DaemonHarness(tmp_path, pair.server)
        harness.write_config(metrics=f"127.0.0.1:{METRICS_PORT}",
                             dnsbl={"zones": ZONES, "connections_per_day": 50_000,
                                    "queries_per_day": 150_000})
        log = Multilog(tmp_path / "log")
        started = time.time()
        harness.start()
        try:
            log.write("".join(line + "\n" for line in SCRIPT))
            deadline = time.monotonic() + 10
            while not {V4, V4_OTHER, V6_BAN} <= harness.kernel_elements():
                assert time.monotonic() < deadline, harness.kernel_elements()
                time.sleep(0.05)
            yield Running(pair, harness, started)
        finally:
            log.close()
            harness.kill()


def connect_from_banned_clients(run: Running) -> None:
    """BLOCKED connects, all at once, each waiting 2.5 s: long enough for its SYN to be
    retransmitted (after 1 s), so packets outnumber connections."""
    from tests.test_firewall_ipset import probe

    pair = run.pair
    got = probe(pair, [(V4, pair.server4, 25)] * BLOCKED["ipv4"]
                + [(V6, pair.server6, 25)] * BLOCKED["ipv6"], timeout=2.5)
    assert got == ["timeout"] * sum(BLOCKED.values())


def test_every_metric_family_holds_what_a_scripted_log_and_real_connections_make(
        tmp_path: Path) -> None:
    require_root_tools("promtool", "nft", "multilog")
    with running_daemon(tmp_path) as run:
        connect_from_banned_clients(run)
        assert "reloaded" in str(run.harness.cli("reload"))
        # a broken rule file: the daemon notices it, keeps its rules, counts a failure
        (tmp_path / "rules.d" / "broken.yaml").write_text("rules: [\n")
        v = run.wait_metrics(lambda v: (
            v.get('rblguard_blocked_connections_total{family="ipv4"}') == BLOCKED["ipv4"]
            and v.get('rblguard_blocked_connections_total{family="ipv6"}') == BLOCKED["ipv6"]
            and v.get('rblguard_rule_reloads_total{result="failure"}') == 1))
        text = run.metrics_text()
        status = run.harness.cli("status", "--json")
    check = subprocess.run(["promtool", "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    source = str(tmp_path / "log")

    expected = {
        f'rblguard_lines_read_total{{source="{source}"}}': len(SCRIPT),
        'rblguard_matches_total{rule="rblsmtpd"}': 3,
        'rblguard_ignored_lines_total{reason="lookup-error",rule="rblsmtpd"}': 1,
        'rblguard_ignored_lines_total{reason="dnsbl-error",rule="rblsmtpd"}': 3,
        'rblguard_parse_errors_total{rule="rblsmtpd"}': 1,
        "rblguard_rbl_lookup_errors_total": 1,
        'rblguard_dnsbl_error_replies_total{kind="open-resolver",zone="spamhaus.org"}': 1,
        'rblguard_dnsbl_error_replies_total{kind="volume",zone="spamhaus.org"}': 1,
        'rblguard_dnsbl_error_replies_total{kind="typo",zone="spamhaus.org"}': 1,
        "rblguard_smtp_connections_total": CONNECTIONS,
        'rblguard_bans_total{family="ipv4",rule="rblsmtpd"}': 2,
        'rblguard_bans_total{family="ipv6",rule="rblsmtpd"}': 1,
        'rblguard_active_bans{family="ipv4"}': 2,
        'rblguard_active_bans{family="ipv6"}': 1,
        'rblguard_blocked_connections_total{family="ipv4"}': BLOCKED["ipv4"],
        'rblguard_blocked_connections_total{family="ipv6"}': BLOCKED["ipv6"],
        # each blocked connection would have reached rblsmtpd and asked up to ZONES zones
        "rblguard_dnsbl_queries_avoided_total": ZONES * sum(BLOCKED.values()),
        "rblguard_dnsbl_zones": ZONES,
        "rblguard_dnsbl_connections_per_day_limit": 50_000,
        "rblguard_dnsbl_queries_per_day_limit": 150_000,
        "rblguard_ban_latency_seconds_count": 3,
        f'rblguard_source_lag_bytes{{source="{source}"}}': 0,
        "rblguard_firewall_healthy": 1,
        'rblguard_rule_reloads_total{result="success"}': 2,  # the start and `reload`
        'rblguard_rule_reloads_total{result="failure"}': 1,  # the broken file
    }
    expected |= {f'rblguard_bans_refused_total{{reason="{r}"}}': 0 for r in (
        "allowlist", "storm_active", "storm_rate", "set_full", "firewall", "invalid")}
    expected |= {f'rblguard_firewall_errors_total{{operation="{op}"}}': 0
                 for op in ("ban", "health", "counters")}
    got = {key: v.get(key) for key in expected}
    assert got == expected
    kinds = {k for k in v if k.startswith("rblguard_dnsbl_error_replies_total{")}
    assert len(kinds) == 3  # one series per kind seen, nothing else

    # packets: every SYN and its retransmits, more than the connections
    for family, n in BLOCKED.items():
        packets = v[f'rblguard_blocked_packets_total{{family="{family}"}}']
        assert packets >= 2 * n, (family, packets)
        assert status["counters"][family] == {
            "connections": n, "packets": packets}, status["counters"]

    # the budget: CONNECTIONS tcpserver lines since the start, over at least a minute
    uptime = status["uptime_s"]
    per_day = CONNECTIONS * 86400 / max(60.0, uptime)
    assert v["rblguard_dnsbl_connections_per_day_estimate"] == \
        (round(per_day) if uptime < 55 else pytest.approx(per_day, rel=0.1))
    assert v["rblguard_dnsbl_queries_per_day_estimate"] == \
        pytest.approx(ZONES * v["rblguard_dnsbl_connections_per_day_estimate"], abs=ZONES)
    assert status["dnsbl"]["queries_avoided_total"] == ZONES * sum(BLOCKED.values())
    assert status["dnsbl"]["connections_seen_total"] == CONNECTIONS

    # timestamps: heartbeat recent, reloads since the start, the failure after the success
    now = time.time()
    assert now - v["rblguard_housekeeping_last_run_timestamp_seconds"] < 15
    success = v["rblguard_rule_reload_last_success_timestamp_seconds"]
    failure = v["rblguard_rule_reload_last_failure_timestamp_seconds"]
    assert run.started - 1 <= success <= failure <= now
    version = __import__("rblguard").__version__
    assert v[f'rblguard_build_info{{version="{version}"}}'] == 1


def test_a_real_prometheus_scraping_rblguard_run_agrees_with_rblguard_status(
        tmp_path: Path) -> None:
    """The issue's requirement: Prometheus scrapes a running rblguard and its query API
    returns the active bans that `rblguard status` reports, per family."""
    require_root_tools("prometheus", "nft", "multilog")
    from tests.test_metrics import prometheus_server

    (tmp_path / "prom").mkdir()
    with (running_daemon(tmp_path) as run,
          prometheus_server([f"127.0.0.1:{METRICS_PORT}"], tmp_path / "prom",
                            netns=run.pair.server) as prom):
        prom.wait_for('up{job="rblguard"}', lambda r: bool(r) and r[0]["value"][1] == "1")
        status = run.harness.cli("status", "--json")
        want = status["active_bans"]
        assert want == {"ipv4": 2, "ipv6": 1}

        def same(result: list[dict]) -> bool:
            return {r["metric"]["family"]: int(r["value"][1]) for r in result} == want

        result = prom.wait_for('rblguard_active_bans{job="rblguard"}', same)
        assert {r["metric"]["instance"] for r in result} == {
            f"127.0.0.1:{METRICS_PORT}"}
        # one more ban through the CLI: status and Prometheus move together
        run.harness.cli("ban", "198.18.9.9", "--for", "10m")
        want = run.harness.cli("status", "--json")["active_bans"]
        assert want == {"ipv4": 3, "ipv6": 1}
        prom.wait_for('rblguard_active_bans{job="rblguard"}', same)
        # and the connections a banned client makes: status reads the kernel now,
        # Prometheus gets them with the next housekeeping round and scrape
        connect_from_banned_clients(run)
        counters = run.harness.cli("status", "--json")["counters"]
        assert {f: c["connections"] for f, c in counters.items()} == BLOCKED
        prom.wait_for("rblguard_blocked_connections_total", lambda r: {
            x["metric"]["family"]: int(x["value"][1]) for x in r} == BLOCKED)
        avoided = prom.query("rblguard_dnsbl_queries_avoided_total")
        assert int(avoided[0]["value"][1]) == ZONES * sum(BLOCKED.values())
