"""Alert rules, dashboard and systemd unit, checked by the real tools (promtool,
systemd-analyze), and a running daemon's /metrics checked by promtool."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import yaml

from rblguard.metrics import Metrics
from tests.netns import require_root_tools

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(rblguard_[a-z_]+)", expr))


def _exposed_names() -> set[str]:
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    names = set(re.findall(r"^(rblguard_[a-z_]+)", text, re.MULTILINE))
    # a labelled metric with no series yet shows only its HELP and TYPE lines
    for name, kind in re.findall(r"^# TYPE (rblguard_[a-z_]+) (\w+)", text, re.MULTILINE):
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    require_root_tools("promtool")
    check = subprocess.run(["promtool", "check", "rules", str(GRAFANA / "alerts.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=GRAFANA,
                          capture_output=True, text=True)
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = {r["alert"] for g in yaml.safe_load((GRAFANA / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    tested = {c["alertname"] for t in yaml.safe_load((GRAFANA / "alerts_test.yml").read_text())
              ["tests"] for c in t["alert_rule_test"] if c["exp_alerts"]}
    assert alerts == tested, f"alerts without a firing unit test: {alerts - tested}"


def test_dashboard_expressions_parse_and_use_real_metrics(tmp_path: Path) -> None:
    require_root_tools("promtool")
    dashboard = json.loads((GRAFANA / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    exposed = _exposed_names()
    alerts_text = (GRAFANA / "alerts.yml").read_text()
    used = set().union(*(_names_in(e) for e in exprs)) | _names_in(alerts_text)
    unknown = {n for n in used if n not in exposed}
    assert not unknown, f"dashboard/alerts use metrics rblguard does not expose: {unknown}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    require_root_tools("systemd-analyze")
    unit = (ROOT / "systemd" / "rblguard.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ExecReload=" in unit
    # verify needs the ExecStart binary to exist: point a copy at a real one.
    fake = tmp_path / "rblguard"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    copy = tmp_path / "rblguard.service"
    copy.write_text(unit.replace("/usr/local/sbin/rblguard", str(fake)))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)],
                          capture_output=True, text=True)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if "rblguard.service" in ln]
    assert proc.returncode == 0 or not problems, proc.stdout + proc.stderr
    assert not problems, problems


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
