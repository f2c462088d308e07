"""A running daemon's /metrics, checked by promtool and counted after a scripted log.

The alert rules (tests/test_alerts.py), the dashboard (tests/test_dashboard.py) and the
systemd unit (tests/test_systemd.py) have their own real-tool checks.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from tests.netns import require_root_tools


def test_running_daemon_metrics_pass_promtool_and_count_a_scripted_log(tmp_path: Path) -> None:
    require_root_tools("promtool", "nft", "multilog")
    from tests.daemon_harness import Multilog, daemon_namespace, reject_message

    with daemon_namespace(tmp_path) as harness:
        harness.write_config(metrics="127.0.0.1:19731")
        log = Multilog(tmp_path / "log")
        harness.start()
        try:
            log.write("tcpserver: pid 1 from 198.18.8.1\n" + reject_message("198.18.8.1"))
            log.write("tcpserver: pid 2 from 192.0.2.8\n")
            log.write("rblsmtpd: 192.0.2.9 pid 3: 451 temporary RBL lookup error\n")
            log.write("rblsmtpd: 192.0.2.10 pid 4: 451 Error: open resolver; "
                      "https://check.spamhaus.org/returnc/pub/203.0.113.53/\n")
            for _ in range(100):
                if "198.18.8.1" in harness.kernel_elements():
                    break
                time.sleep(0.05)
            time.sleep(6)  # one housekeeping round: counters, gauges
            text = subprocess.run(
                ["ip", "netns", "exec", harness.ns, "python3", "-c",
                 "import urllib.request;print(urllib.request.urlopen("
                 "'http://127.0.0.1:19731/metrics').read().decode())"],
                capture_output=True, text=True, check=True).stdout
        finally:
            log.close()
    check = subprocess.run(["promtool", "check", "metrics"], input=text,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

    def value(series: str) -> float:
        m = re.search(r"^" + re.escape(series) + r" ([0-9.e+]+)$", text, re.MULTILINE)
        assert m, f"{series} missing"
        return float(m.group(1))

    assert value('rblguard_matches_total{rule="rblsmtpd"}') == 1
    assert value("rblguard_smtp_connections_total") == 2
    assert value("rblguard_rbl_lookup_errors_total") == 1
    assert value('rblguard_dnsbl_error_replies_total{kind="dnsbl-error",zone="spamhaus.org"}') \
        == 1
    assert value('rblguard_bans_total{family="ipv4",rule="rblsmtpd"}') == 1
    assert value('rblguard_active_bans{family="ipv4"}') == 1
    assert value("rblguard_firewall_healthy") == 1
    assert value("rblguard_ban_latency_seconds_count") == 1
