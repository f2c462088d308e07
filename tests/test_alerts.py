"""The alert rules: promtool accepts them, their unit tests pass, and no alert goes
untested or without the annotations that tell an admin what to do."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.netns import require_root_tools

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
ALERTS = GRAFANA / "alerts.yml"
ALERT_TESTS = GRAFANA / "alerts_test.yml"


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60,
                          cwd=GRAFANA)


def test_promtool_check_rules() -> None:
    require_root_tools("promtool")
    proc = promtool("check", "rules", ALERTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    require_root_tools("promtool")
    proc = promtool("test", "rules", ALERT_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """promtool only checks the alerts a test names: an untested alert would pass."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_every_alert_says_what_to_do() -> None:
    severities = {"critical", "warning", "info"}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in severities, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]
        assert rule["alert"].startswith("Rblguard"), rule["alert"]


def test_dnsbl_error_replies_are_critical_and_storm_refusals_warn() -> None:
    """The house's severities: a DNSBL refusing us stops all mail; storms only bans."""
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    assert by_name["RblguardDnsblRefusingQueries"]["labels"]["severity"] == "critical"
    assert "for" not in by_name["RblguardDnsblRefusingQueries"]  # at once, on the first
    assert by_name["RblguardBansRefused"]["labels"]["severity"] == "warning"
    assert by_name["RblguardAllowlistedClientRejected"]["labels"]["severity"] == "info"


def test_docs_say_what_to_do_for_every_alert() -> None:
    docs = (GRAFANA.parent / "docs" / "operations.md").read_text()
    undocumented = [r["alert"] for r in alert_rules() if f"`{r['alert']}`" not in docs]
    assert not undocumented
