"""Shared by the operator-kit tests: the alert rules and the Grafana dashboard as shipped
(helm/token-broker/files/), the PromQL in them, and promtool.

`metric_names` finds the metric names a PromQL expression selects, without a PromQL parser
(none is packaged for Python): string literals, label matchers, ranges, grouping clauses and
numbers are removed, and what is left that is neither a function call nor a keyword is a
metric name. Grafana's `$variables` only occur inside those removed parts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
FILES = ROOT / "helm" / "token-broker" / "files"
ALERTS = FILES / "alerts.yaml"
DASHBOARD = FILES / "grafana-dashboard.json"
ALERT_UNIT_TESTS = ROOT / "tests" / "data" / "prometheus" / "alerts.test.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
# The base of every runbook_url in alerts.yaml (the chart's prometheusRule.runbookBaseUrl
# replaces it).
RUNBOOK_BASE = "https://token-broker.example.com/runbooks/"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?(?![\w:])", re.I)
_IDENTIFIER = re.compile(r"[A-Za-z_:][\w:]*")
_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (PromQL)."""
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yaml (all groups)."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


_LABEL_VALUES = re.compile(r"^label_values\((?:(.*),\s*)?(\w+)\)$")


def dashboard_queries() -> dict[str, str]:
    """Every PromQL expression of the dashboard, by where it is (panel title / refId, or the
    template variable); a variable's `label_values(selector, label)` gives its selector."""
    queries = {}
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            queries[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = _LABEL_VALUES.match(query)
            assert match is not None, f"variable {variable['name']}: {query}"
            if match.group(1):
                queries[f"variable {variable['name']}"] = match.group(1)
    return queries


def grafana_to_promql(expr: str) -> str:
    """`expr` with Grafana's variables replaced, as Grafana sends it."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool; fails (never skips) when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "no promtool on PATH: `make promtool` installs it (Debian's prometheus package); "
            "`make test` does that by itself"
        )
    return subprocess.run(
        [path, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def runbook_anchors() -> set[str]:
    """The anchors of docs/runbooks.md's sections (MkDocs and GitHub: the heading in lower
    case, for headings that are one word)."""
    headings = re.findall(r"^##\s+(.+?)\s*$", RUNBOOKS.read_text(), re.MULTILINE)
    return {heading.lower() for heading in headings}
