"""The Prometheus alert rules (helm/token-broker/files/alerts.yaml) and their runbooks.

promtool (Debian's `prometheus` package, installed by `make promtool`) checks the file and
runs its unit tests (tests/data/prometheus/alerts.test.yaml): every alert fires on the series
that should fire it, with its labels and annotations exactly, and stays quiet on healthy
ones. That the metrics the expressions name exist in a real broker's /metrics is checked in
tests/test_operator_kit_metrics.py.
"""

from __future__ import annotations

import re
from collections import defaultdict

import yaml

from tests.support.operator_kit import (
    ALERT_UNIT_TESTS,
    ALERTS,
    RUNBOOK_BASE,
    RUNBOOKS,
    alert_rules,
    metric_names,
    promtool,
    runbook_anchors,
)

# What an on-call person must know (the list), each an alert.
EXPECTED_ALERTS = {
    "TokenBrokerDown",  # broker not ready (all replicas), or not scraped
    "TokenBrokerNotReady",  # broker not ready (one replica)
    "TokenBrokerKubernetesAPIUnreachable",  # the API server unreachable
    "TokenBrokerUpstreamErrors",  # upstream errors rising
    "TokenBrokerUpstreamThrottled",  # upstream 429s rising
    "TokenBrokerRateLimitRefusalsHigh",  # rate-limit refusals spiking
    "TokenBrokerRedisUnavailable",  # the shared rate limits' Redis
    "TokenBrokerCacheHitRatioCollapsed",  # cache hit ratio collapsing
    "TokenBrokerAuditLinesLost",  # audit lines lost
    "TokenBrokerAuditSinkDown",  # the audit sink blocked or failing
    "TokenBrokerCertificateExpiring",  # TLS certificate expiring
    "TokenBrokerReloadFailing",  # policy (or another followed file) reload failing
}


def test_the_rules_pass_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = promtool("test", "rules", ALERT_UNIT_TESTS.name, cwd=ALERT_UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_use_the_shipped_rules_file() -> None:
    tests = yaml.safe_load(ALERT_UNIT_TESTS.read_text())
    [rule_file] = tests["rule_files"]
    assert (ALERT_UNIT_TESTS.parent / rule_file).resolve() == ALERTS.resolve()


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    fired: dict[str, set[str]] = defaultdict(set)  # alertname -> severities seen firing
    quiet: set[str] = set()
    for test in yaml.safe_load(ALERT_UNIT_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            if case.get("exp_alerts"):
                for alert in case["exp_alerts"]:
                    fired[case["alertname"]].add(alert["exp_labels"]["severity"])
            else:
                quiet.add(case["alertname"])
    severities: dict[str, set[str]] = defaultdict(set)
    for rule in alert_rules():
        severities[rule["alert"]].add(rule["labels"]["severity"])
    assert set(severities) == EXPECTED_ALERTS
    for name, expected in severities.items():
        assert fired[name] == expected, f"{name}: fires untested for {expected - fired[name]}"
        assert name in quiet, f"{name}: no test where it does not fire"


def test_every_alert_says_how_bad_what_and_where_to_look() -> None:
    anchors = runbook_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"TokenBroker[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}#{name.lower()}", name
        assert name.lower() in anchors, f"{name}: no section in {RUNBOOKS.name}"
        # Only the broker's own series (or its gRPC service's): no job name to configure.
        for metric in metric_names(rule["expr"]):
            assert metric.startswith(("token_broker_", "grpc_server_")), (name, metric)
        if "grpc_server_" in rule["expr"]:
            assert 'grpc_service="tokenbroker.v1.TokenBrokerService"' in rule["expr"], name


def test_every_runbook_section_is_an_alert_with_meaning_impact_diagnosis_action() -> None:
    text = RUNBOOKS.read_text()
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    names = {rule["alert"] for rule in alert_rules()}
    assert {section.split("\n", 1)[0].strip() for section in sections} == names
    for section in sections:
        for part in ("**Meaning.**", "**Impact.**", "**Diagnosis.**", "**Action.**"):
            assert part in section, f"{section.splitlines()[0]}: no {part}"
    # Links between sections point at sections that exist.
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in runbook_anchors(), anchor


def test_metric_names_finds_what_an_expression_selects() -> None:
    expr = (
        'sum by (namespace, job, scope) (rate(token_broker_rate_limit_refusals_total{a="b"}[5m]))'
        " / ignoring (scope) group_left sum by (job) (rate(grpc_server_handled_total"
        '{grpc_service="x", grpc_method=~"Create.*"}[$__rate_interval] offset 1d)) > 0.1'
        " and time() - token_broker_tls_certificate_expiry_timestamp_seconds < 7 * 86400"
        " or absent(token_broker_ready) unless on (instance) up == bool 1e3"
    )
    assert metric_names(expr) == {
        "token_broker_rate_limit_refusals_total",
        "grpc_server_handled_total",
        "token_broker_tls_certificate_expiry_timestamp_seconds",
        "token_broker_ready",
        "up",
    }
