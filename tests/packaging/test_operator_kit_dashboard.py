"""The Grafana dashboard (helm/token-broker/files/grafana-dashboard.json): it parses, has the
panels an operator looks for, selects its data source through a `datasource` variable, and
every query is valid PromQL (promtool checks them as recording rules). That the metrics it
queries exist in a real broker's /metrics is checked in tests/test_operator_kit_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.support.operator_kit import (
    DASHBOARD,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
    promtool,
)

# Grafana 11 (39) onwards; older versions import it too, newer ones migrate it.
MIN_SCHEMA_VERSION = 39


def test_the_dashboard_parses_and_is_a_grafana_dashboard() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= MIN_SCHEMA_VERSION
    assert board["uid"] == "token-broker" and board["title"] == "token-broker"
    # An importable dashboard: no id of some other Grafana's database.
    assert "id" not in board or board["id"] is None
    ids = [panel["id"] for panel in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_the_data_source_is_a_variable_used_by_every_query() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job", "instance"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # Every query is scoped by the namespace, job and instance variables.
            for variable in ("$namespace", "$job", "$instance"):
                assert variable in target["expr"], (panel["title"], target["refId"])


def test_the_panels_an_operator_looks_for() -> None:
    queried: dict[str, set[str]] = {}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queried.setdefault(panel["title"], set()).update(metric_names(target["expr"]))

    def panel_querying(*metrics: str) -> str:
        found = [title for title, names in queried.items() if set(metrics) <= names]
        assert found, f"no panel queries {metrics}"
        return found[0]

    requests = panel_querying("grpc_server_handled_total")
    assert any("by (grpc_code)" in t["expr"] for t in _targets(requests))
    latency = _targets(panel_querying("grpc_server_handling_seconds_bucket"))
    assert {t["legendFormat"] for t in latency} == {"p50", "p90", "p99"}
    panel_querying("token_broker_cache_hits_total", "token_broker_cache_misses_total")
    upstream = panel_querying("token_broker_upstream_requests_total")
    assert any("by (code)" in t["expr"] for t in _targets(upstream))
    refusals = panel_querying("token_broker_rate_limit_refusals_total")
    assert any("by (scope)" in t["expr"] for t in _targets(refusals))
    panel_querying("token_broker_tokens_issued_total")
    panel_querying("token_broker_ready")
    panel_querying("token_broker_audit_lines_lost_total")
    panel_querying("process_resident_memory_bytes")
    panel_querying("process_cpu_seconds_total")


def _targets(title: str) -> list[dict[str, str]]:
    [panel] = [p for p in dashboard_panels() if p["title"] == title]
    return list(panel["targets"])


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = [
        {"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
        for i, expr in enumerate(queries.values())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
