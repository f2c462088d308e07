"""The Grafana dashboard: importable (datasource as an input), every query valid PromQL
by promtool, every metric it and the alerts name really exported by Metrics, and every
panel answered by a real Prometheus scraping a real Metrics endpoint."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.netns import require_root_tools
from tests.test_metrics import busy_metrics, free_port, prometheus_server

GRAFANA = Path(__file__).resolve().parent.parent / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboard.json").read_text())
# Grafana fills these in before a query reaches Prometheus
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "$instance": ".*"}
METRIC = re.compile(r"\brblguard_[a-z0-9_]+")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title + refId, expr) for every target, Grafana variables substituted."""
    queries = []
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((f"{panel['title']} {target['refId']}", expr))
    return queries


def exported_names() -> set[str]:
    """Every sample name a Metrics endpoint exposes (with _total, _bucket, ...)."""
    return {s.name for family in busy_metrics().registry.collect() for s in family.samples}


def test_dashboard_is_importable_with_a_datasource_input() -> None:
    assert [i["name"] for i in DASHBOARD["__inputs"]] == ["DS_PROMETHEUS"]
    assert DASHBOARD["__inputs"][0]["pluginId"] == "prometheus"
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    text = json.dumps(DASHBOARD)
    for needed in ("rblguard_active_bans", "rblguard_bans_total",
                   "rblguard_blocked_connections_total", "rblguard_dnsbl_queries_avoided_total",
                   "rblguard_dnsbl_queries_per_day_limit", "histogram_quantile",
                   "rblguard_dnsbl_error_replies_total", "rblguard_lines_read_total",
                   "rblguard_source_lag_bytes"):
        assert needed in text, needed


def test_dnsbl_error_replies_are_shown_by_kind() -> None:
    """The reply's kind says what to fix; the panel keeps it apart and explains each."""
    [panel] = [p for p in DASHBOARD["panels"]
               if any("rblguard_dnsbl_error_replies_total" in t["expr"]
                      and "by (zone, kind)" in t["expr"] for t in p["targets"])]
    assert "{{kind}}" in json.dumps(panel["targets"])
    from rblguard.daemon.metrics import DNSBL_ERROR_KINDS

    for kind in DNSBL_ERROR_KINDS:
        assert f"{kind}:" in panel["description"], kind


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule: a typo fails here, not in Grafana."""
    require_root_tools("promtool")
    rules = [{"record": f"dashboard:query_{i}", "expr": expr}
             for i, (_title, expr) in enumerate(dashboard_queries())]
    variable_query = DASHBOARD["templating"]["list"][0]["query"]["query"]
    assert variable_query.startswith("label_values(rblguard_build_info")
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_every_metric_named_is_exported() -> None:
    exported = exported_names()
    in_dashboard = set(METRIC.findall(json.dumps(DASHBOARD)))
    in_alerts = set(METRIC.findall((GRAFANA / "alerts.yml").read_text()))
    in_alerts |= set(METRIC.findall((GRAFANA / "alerts_test.yml").read_text()))
    assert in_dashboard - exported == set()
    assert in_alerts - exported == set()
    assert len(in_dashboard) >= 15


def test_a_real_prometheus_answers_every_panel(tmp_path: Path) -> None:
    """Each query runs without error on a scraped endpoint; the plain ones have data."""
    require_root_tools("prometheus")
    m = busy_metrics()
    port = free_port()
    m.serve(f"127.0.0.1:{port}")
    try:
        with prometheus_server([f"127.0.0.1:{port}"], tmp_path) as prom:
            prom.wait_for("rblguard_active_bans", lambda r: len(r) == 2)
            for title, expr in dashboard_queries():
                result = prom.query(expr)  # asserts status "success"
                if "rate(" not in expr and "increase(" not in expr:
                    assert result, f"{title}: {expr} returned nothing"
            active = {r["metric"]["family"]: r["value"][1] for r in prom.query(
                dashboard_queries()[0][1])}
            assert active == {"ipv4": "42", "ipv6": "7"}
    finally:
        m.close()


def test_every_metric_is_documented() -> None:
    """docs/operations.md and the metrics module's docstring list each metric family."""
    import rblguard.daemon.metrics

    docs = (GRAFANA.parent / "docs" / "operations.md").read_text()
    families = {family.name for family in busy_metrics().registry.collect()}
    counters = {f.name for f in busy_metrics().registry.collect() if f.type == "counter"}
    names = {f"{n}_total" if n in counters else n for n in families}
    assert len(names) >= 25
    assert [n for n in names if f"`{n}" not in docs] == []
    import rblguard.fleet.metrics

    docstring = (rblguard.daemon.metrics.__doc__ or "") + (rblguard.fleet.metrics.__doc__ or "")
    shorthand = {"rblguard_dnsbl_queries_per_day_estimate", "rblguard_dnsbl_queries_per_day_limit",
                 "rblguard_dnsbl_connections_per_day_estimate",
                 "rblguard_dnsbl_connections_per_day_limit"}  # one line there: {a,b}_{c,d}
    assert [n for n in names - shorthand if n not in docstring] == []
