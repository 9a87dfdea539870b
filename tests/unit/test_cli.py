"""The token-broker command line, parsed in-process: `token`'s flags (checked like kubectl's),
Go durations, and `serve`'s flags over its config file. The commands against a running broker
and `serve` as a real process: tests/e2e/test_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import build_parser, main
from broker.cli.serve import serve_overrides
from broker.config import load_settings
from broker.durations import parse_go_duration

# --- token ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--duration=-1h"], "--duration must be greater than or equal to 0"),
        (["--duration", "90500ms"], "--duration cannot be expressed in units less than seconds"),
        (["--audience", ""], "--audience must not be an empty string"),
        (["--bound-object-name", "x"], "--bound-object-name can only be set if"),
        (["--bound-object-uid", "u"], "--bound-object-uid can only be set if"),
        (["--bound-object-kind", "Job", "--bound-object-name", "x"], "supported --bound"),
        (["--bound-object-kind", "Pod"], "--bound-object-name is required"),
        (["--cert", "/c"], "--cert and --key must be given together"),
    ],
)
def test_token_flag_validation_like_kubectl(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "sa", "-n", "demo", *flags]) == 2
    assert message in capsys.readouterr().err


def test_token_requires_a_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["token", "sa"])
    assert info.value.code == 2
    assert "--namespace" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("1h", 3600), ("1h30m", 5400), ("3600s", 3600), ("0", 0), ("1.5h", 5400)],
)
def test_go_durations(text: str, seconds: int) -> None:
    assert parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1d", "h", "1h 2m", "--1s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_go_duration(text)


# --- serve --------------------------------------------------------------------------------------


def test_serve_flags_override_the_file(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "server:\n  listen: 127.0.0.1:7001\n  shutdownGraceSeconds: 3\n"
        "kubernetes:\n  context: from-file\nlog:\n  level: warning\n"
    )
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--listen", "127.0.0.1:7002", "--kubeconfig", "/k"]
    )
    settings = load_settings(args.config, serve_overrides(args))
    assert settings.server.listen == "127.0.0.1:7002"
    assert settings.server.shutdown_grace_seconds == 3
    assert settings.kubernetes.kubeconfig == Path("/k")
    assert settings.kubernetes.mode == "kubeconfig"
    assert settings.kubernetes.context == "from-file"
    assert settings.log.level == "warning"


def test_serve_admin_listen_flag() -> None:
    for flag, expected in (("127.0.0.1:9191", "127.0.0.1:9191"), ("", None)):
        args = build_parser().parse_args(["serve", "--admin-listen", flag])
        assert load_settings(None, serve_overrides(args)).admin.listen == expected


def test_serve_bad_config_exits_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  listen: 127.0.0.1:7001\n  shutdownGraceSecs: 3\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "server.shutdownGraceSecs" in capsys.readouterr().err
