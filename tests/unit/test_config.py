"""Settings: file < TOKEN_BROKER_* environment < flags, and errors that name the bad key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.config import (
    ConfigError,
    check_transport_security,
    is_loopback_address,
    load_settings,
    split_host_port,
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TOKEN_BROKER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


FILE = """\
server:
  listen: 127.0.0.1:7001
  unixSocket: /run/file.sock
  tls: {certFile: /tls/file.crt, keyFile: /tls/file.key}
kubernetes:
  kubeconfig: /kube/file
  retry: {maxAttempts: 3}
log: {level: warning}
"""


def test_defaults_without_file_env_or_flags() -> None:
    settings = load_settings()
    assert settings.server.listen == "127.0.0.1:50051"
    assert settings.server.tls is None
    assert settings.server.allow_plaintext is False
    assert settings.log.format == "json"
    assert settings.dev is False


def test_file_values(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, FILE))
    assert settings.server.listen == "127.0.0.1:7001"
    assert settings.server.unix_socket == Path("/run/file.sock")
    assert settings.server.tls is not None
    assert settings.server.tls.cert_file == Path("/tls/file.crt")
    assert settings.kubernetes.kubeconfig == Path("/kube/file")
    assert settings.kubernetes.retry.max_attempts == 3
    assert settings.log.level == "warning"


def test_environment_overrides_file_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_BROKER_SERVER__LISTEN", "127.0.0.1:7002")
    # The environment spells camelCase keys in snake case; both forms override the file's.
    monkeypatch.setenv("TOKEN_BROKER_SERVER__UNIX_SOCKET", "/run/env.sock")
    monkeypatch.setenv("TOKEN_BROKER_KUBERNETES__RETRY__MAX_ATTEMPTS", "5")
    settings = load_settings(write(tmp_path, FILE))
    assert settings.server.listen == "127.0.0.1:7002"
    assert settings.server.unix_socket == Path("/run/env.sock")
    assert settings.kubernetes.retry.max_attempts == 5
    # Untouched keys of the same sections keep the file's values.
    assert settings.server.tls is not None
    assert settings.server.tls.key_file == Path("/tls/file.key")
    assert settings.kubernetes.kubeconfig == Path("/kube/file")
    assert settings.log.level == "warning"


def test_flags_override_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKEN_BROKER_SERVER__LISTEN", "127.0.0.1:7002")
    monkeypatch.setenv("TOKEN_BROKER_SERVER__UNIX_SOCKET", "/run/env.sock")
    monkeypatch.setenv("TOKEN_BROKER_LOG__LEVEL", "error")
    overrides = {"server": {"listen": "127.0.0.1:7003", "unixSocket": "/run/flag.sock"}}
    settings = load_settings(write(tmp_path, FILE), overrides)
    assert settings.server.listen == "127.0.0.1:7003"
    assert settings.server.unix_socket == Path("/run/flag.sock")
    assert settings.log.level == "error"  # environment, no flag given
    assert settings.server.tls is not None  # file, neither env nor flag
    assert settings.server.tls.cert_file == Path("/tls/file.crt")


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  lisen: 127.0.0.1:1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "server.lisen" in message
    assert str(path) in message


def test_bad_value_is_named_in_yaml_spelling(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  shutdownGraceSeconds: -1\n")
    with pytest.raises(ConfigError, match=r"server\.shutdownGraceSeconds"):
        load_settings(path)


def test_shutdown_delay_defaults_to_none_and_is_not_negative(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "{}\n")).server.shutdown_delay_seconds == 0
    path = write(tmp_path, "server:\n  shutdownDelaySeconds: 2.5\n")
    assert load_settings(path).server.shutdown_delay_seconds == 2.5
    path = write(tmp_path, "server:\n  shutdownDelaySeconds: -1\n")
    with pytest.raises(ConfigError, match=r"server\.shutdownDelaySeconds"):
        load_settings(path)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_LOG__LEVEL", "loud")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "log.level" in str(info.value)
    assert "TOKEN_BROKER_LOG__LEVEL" in str(info.value)


def test_unknown_environment_key_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_SERVER__LISEN", "127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"server\.lisen"):
        load_settings()


def test_malformed_json_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_SERVER", "{not json")
    with pytest.raises(ConfigError, match="server"):
        load_settings()


def test_same_key_twice_in_one_source(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  unixSocket: /a\n  unix_socket: /b\n")
    with pytest.raises(ConfigError, match="unixSocket is given twice"):
        load_settings(path)


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"cannot read config file .*nope\.yaml"):
        load_settings(missing)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")).server.listen == "127.0.0.1:50051"


def test_no_listener_at_all_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"server\.listen or server\.unixSocket"):
        load_settings(None, {"server": {"listen": None}})


@pytest.mark.parametrize(
    ("raw", "mode"),
    [("0600\n", 0o600), ('"0640"\n', 0o640), ('"0o660"\n', 0o660)],
)
def test_unix_socket_mode_is_octal(tmp_path: Path, raw: str, mode: int) -> None:
    settings = load_settings(write(tmp_path, f"server:\n  unixSocketMode: {raw}"))
    assert settings.server.unix_socket_mode == mode


def test_unix_socket_mode_from_environment_is_octal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_BROKER_SERVER__UNIX_SOCKET_MODE", "0600")
    assert load_settings().server.unix_socket_mode == 0o600


def test_decimal_looking_unix_socket_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.unixSocketMode.*octal"):
        load_settings(write(tmp_path, "server:\n  unixSocketMode: 660\n"))


# --- transport security rules ---------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "10.1.2.3:50051", "[::]:50051"])
def test_plaintext_refused_off_loopback_even_when_allowed(listen: str) -> None:
    for allow in (False, True):
        settings = load_settings(None, {"server": {"listen": listen, "allowPlaintext": allow}})
        with pytest.raises(ConfigError, match=r"server\.(tls|listen)"):
            check_transport_security(settings)


def test_plaintext_on_loopback_needs_allow_plaintext() -> None:
    settings = load_settings(None, {"server": {"listen": "127.0.0.1:0"}})
    with pytest.raises(ConfigError, match="allowPlaintext"):
        check_transport_security(settings)
    allowed = load_settings(None, {"server": {"listen": "127.0.0.1:0", "allowPlaintext": True}})
    check_transport_security(allowed)


def test_dev_mode_allows_plaintext_on_loopback_only() -> None:
    check_transport_security(load_settings(None, {"dev": True}))
    wide = load_settings(None, {"dev": True, "server": {"listen": "0.0.0.0:50051"}})
    with pytest.raises(ConfigError, match="loopback"):
        check_transport_security(wide)


def test_tls_allows_any_address() -> None:
    settings = load_settings(
        None,
        {"server": {"listen": "0.0.0.0:50051", "tls": {"certFile": "/c", "keyFile": "/k"}}},
    )
    check_transport_security(settings)


def test_unix_socket_alone_may_be_plaintext() -> None:
    settings = load_settings(None, {"server": {"listen": None, "unixSocket": "/run/b.sock"}})
    check_transport_security(settings)


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:1", True),
        ("127.9.9.9:1", True),
        ("[::1]:1", True),
        ("localhost:1", True),
        ("0.0.0.0:1", False),
        ("[::]:1", False),
        ("example.com:1", False),
    ],
)
def test_is_loopback_address(listen: str, loopback: bool) -> None:
    assert is_loopback_address(listen) is loopback


def test_split_host_port() -> None:
    assert split_host_port("[::1]:50051") == ("[::1]", 50051)
    assert split_host_port("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("50051", ":50051", "host:", "host:http", "host:70000"):
        with pytest.raises(ConfigError, match=r"server\.listen"):
            split_host_port(bad)


def test_health_listen_must_be_host_port() -> None:
    settings = load_settings(None, {"server": {"allowPlaintext": True, "healthListen": "8081"}})
    with pytest.raises(ConfigError, match=r"server\.healthListen"):
        check_transport_security(settings)
    ok = load_settings(None, {"server": {"allowPlaintext": True, "healthListen": "0.0.0.0:8081"}})
    check_transport_security(ok)  # health only: plaintext on any address
