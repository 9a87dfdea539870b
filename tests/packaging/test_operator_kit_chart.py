"""The chart's operator kit: the optional PrometheusRule and Grafana dashboard ConfigMap.

Both are rendered from the files that ship as they are (helm/token-broker/files/alerts.yaml,
grafana-dashboard.json), so the chart and the plain files cannot drift apart; rendered with
the real helm through tests/test_helm.py's helpers, the ConfigMap validated with
kubernetes-validate, the rules checked again with promtool as rendered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.packaging.test_helm import (
    CHART,
    FULLNAME,
    KUBE_VERSION,
    NAMESPACE,
    PRODUCTION,
    helm,
    kinds,
    one,
    render,
    render_error,
)
from tests.support.operator_kit import ALERTS, DASHBOARD, RUNBOOK_BASE, promtool

ADDITIONAL_RULE = {
    "alert": "TokenBrokerSlowForUs",
    "expr": "histogram_quantile(0.99, sum by (le) (rate(grpc_server_handling_seconds_bucket"
    '{grpc_method="CreateToken"}[5m]))) > 1',
    "for": "15m",
    "labels": {"severity": "warning", "team": "platform"},
    "annotations": {"summary": "CreateToken p99 above 1 s."},
}


def alerts_file(base: str = RUNBOOK_BASE) -> dict[str, Any]:
    return dict(yaml.safe_load(ALERTS.read_text().replace(RUNBOOK_BASE, base)))


def test_off_by_default() -> None:
    docs = render({})
    assert not kinds(docs, "PrometheusRule")
    assert [d["metadata"]["name"] for d in kinds(docs, "ConfigMap")] == [FULLNAME]


def test_the_prometheus_rule_is_the_rules_file() -> None:
    docs = render({"prometheusRule": {"enabled": True}})
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["name"] == FULLNAME
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "token-broker"
    assert rule["spec"] == {"groups": alerts_file()["groups"]}


def test_labels_namespace_runbook_base_and_additional_rules(tmp_path: Path) -> None:
    base = "https://docs.internal.example/platform/token-broker/runbooks/"
    docs = render(
        {
            "prometheusRule": {
                "enabled": True,
                "namespace": "monitoring",
                "labels": {"release": "kube-prometheus-stack"},
                "runbookBaseUrl": base,
                "additionalRules": [ADDITIONAL_RULE],
            }
        }
    )
    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped, additional = rule["spec"]["groups"]
    assert shipped == alerts_file(base)["groups"][0]
    urls = [r["annotations"]["runbook_url"] for r in shipped["rules"]]
    assert urls and all(url.startswith(base + "#tokenbroker") for url in urls)
    assert additional == {"name": "token-broker-additional", "rules": [ADDITIONAL_RULE]}
    # What Prometheus would load from the rendered object passes promtool too.
    rendered = tmp_path / "rendered-rules.yaml"
    rendered.write_text(yaml.safe_dump(rule["spec"]))
    result = promtool("check", "rules", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_config_map_carries_the_dashboard_for_the_sidecar() -> None:
    docs = render({"grafanaDashboard": {"enabled": True}})
    config_map = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    kubernetes_validate.validate(config_map, KUBE_VERSION, strict=True)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert "annotations" not in config_map["metadata"]
    [(key, text)] = config_map["data"].items()
    assert key.endswith(".json")
    assert json.loads(text) == json.loads(DASHBOARD.read_text())


def test_the_dashboard_label_namespace_and_folder_are_configurable() -> None:
    values = {
        "grafanaDashboard": {
            "enabled": True,
            "namespace": "grafana",
            "labels": {"grafana_dashboard": "token-broker"},
            "annotations": {"grafana_folder": "Platform"},
        }
    }
    config_map = one(render(values), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["namespace"] == "grafana"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "token-broker"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Platform"}


def test_the_production_example_turns_both_on() -> None:
    docs = render(PRODUCTION)
    assert one(docs, "PrometheusRule")["metadata"]["labels"]["release"] == "prometheus"
    one(docs, "ConfigMap", f"{FULLNAME}-dashboard")


def test_helm_lint_strict_with_both_on(tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "prometheusRule": {"enabled": True, "additionalRules": [ADDITIONAL_RULE]},
                "grafanaDashboard": {"enabled": True},
            }
        )
    )
    result = helm(
        "lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION, "--values", str(values)
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"prometheusRule": {"runbookBaseUrl": "https://docs.example/runbooks"}},
            "at '/prometheusRule/runbookBaseUrl'",
        ),
        (
            {"prometheusRule": {"additionalRules": [{"alert": "X"}]}},
            "at '/prometheusRule/additionalRules/0'",
        ),
        (
            {"prometheusRule": {"additionalRules": [{"alert": "X", "expr": "up", "for": "soon"}]}},
            "at '/prometheusRule/additionalRules/0/for'",
        ),
        ({"grafanaDashboard": {"label": "x"}}, "additional properties 'label' not allowed"),
    ],
)
def test_the_schema_rejects_bad_values(values: dict[str, Any], message: str) -> None:
    assert message in render_error(values)
