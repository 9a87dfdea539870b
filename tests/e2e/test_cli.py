"""The token-broker command: `token` against a running broker, `serve` as a real process.

The CLI runs as a subprocess (`python -m broker`), so the broker and the emulator in this
test's event loop keep serving while it runs. Its flags and Go durations, parsed in-process:
tests/unit/test_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import tempfile
from pathlib import Path

import aiohttp
import pytest
import yaml
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from broker.authn_apikeys import generate_api_key, hash_api_key
from broker.config import KubernetesSettings
from broker.emulator import Emulator
from broker.server import SERVICE_NAME, BrokerServer
from tests.support.cli import Process, Spawn, claims, issue, run_cli, serve_config
from tests.support.stack import (
    CALLER,
    CALLER_KEY,
    NAMESPACE,
    POD,
    SERVICE_ACCOUNT,
    RunningBroker,
    broker_settings,
)

# --- token ------------------------------------------------------------------------------------


async def test_token_prints_just_the_token(broker: RunningBroker) -> None:
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", broker.address, "--plaintext"
    )
    assert rc == 0, err
    assert out.count(".") == 2
    assert "\n" not in out  # like kubectl: no newline when stdout is not a terminal
    assert claims(out)["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"


async def test_token_json_is_a_kubernetes_token_request(broker: RunningBroker) -> None:
    rc, out, err = await run_cli(
        "token",
        SERVICE_ACCOUNT,
        "--namespace",
        NAMESPACE,
        "--audience",
        "https://a.example",
        "--audience",
        "https://b.example",
        "--duration",
        "1h30m",
        "--bound-object-kind",
        "Pod",
        "--bound-object-name",
        POD,
        "-o",
        "json",
        "--server",
        broker.address,
        "--plaintext",
    )
    assert rc == 0, err
    obj = json.loads(out)
    assert list(obj) == ["kind", "apiVersion", "metadata", "spec", "status"]
    assert obj["kind"] == "TokenRequest"
    assert obj["apiVersion"] == "authentication.k8s.io/v1"
    assert obj["metadata"]["name"] == SERVICE_ACCOUNT
    assert obj["metadata"]["namespace"] == NAMESPACE
    spec = obj["spec"]
    assert spec["audiences"] == ["https://a.example", "https://b.example"]
    assert spec["expirationSeconds"] == 5400  # a number, as Kubernetes writes it
    assert spec["boundObjectRef"]["kind"] == "Pod"
    assert spec["boundObjectRef"]["apiVersion"] == "v1"
    assert spec["boundObjectRef"]["name"] == POD
    token = obj["status"]["token"]
    assert claims(token)["aud"] == ["https://a.example", "https://b.example"]
    assert obj["status"]["expirationTimestamp"].endswith("Z")


async def test_token_yaml_matches_the_json_shape(broker: RunningBroker) -> None:
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "-o", "yaml", "--server", broker.address,
        "--plaintext",
    )  # fmt: skip
    assert rc == 0, err
    obj = yaml.safe_load(out)
    assert obj["kind"] == "TokenRequest"
    assert obj["apiVersion"] == "authentication.k8s.io/v1"
    assert obj["metadata"]["name"] == SERVICE_ACCOUNT
    assert obj["status"]["token"].count(".") == 2


@pytest.mark.emulator_config(max_expiration_seconds=3600)
async def test_token_warnings_go_to_stderr(broker: RunningBroker) -> None:
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration", "2h",
        "--server", broker.address, "--plaintext",
    )  # fmt: skip
    assert rc == 0, err
    assert out.count(".") == 2
    assert "Warning: requested expiration of 7200 seconds shortened to 3600 seconds" in err


async def test_token_error_prints_code_message_and_reason(broker: RunningBroker) -> None:
    rc, out, err = await run_cli(
        "token", "no-such-account", "-n", NAMESPACE, "--server", broker.address, "--plaintext"
    )
    assert rc == 1
    assert out == ""
    assert "NOT_FOUND" in err
    assert "no-such-account" in err
    # The ErrorInfo reason (UPPER_SNAKE_CASE) and domain, then its metadata.
    assert re.search(r"^  reason: [A-Z][A-Z0-9_]+ \(domain [a-z0-9.]+\)$", err, re.MULTILINE), err


async def test_token_error_lists_field_violations(broker: RunningBroker) -> None:
    rc, _, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--duration", "1m",
        "--server", broker.address, "--plaintext",
    )  # fmt: skip
    assert rc == 1
    assert "INVALID_ARGUMENT" in err
    assert "field token_request.spec.expiration_seconds:" in err


async def test_token_dry_run(broker: RunningBroker, emulator: Emulator) -> None:
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--dry-run", "-o", "json",
        "--server", broker.address, "--plaintext",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["kind"] == "TokenRequest"
    assert emulator.token_requests[-1].query.get("dryRun") == "All"


async def test_token_unreachable_server(tmp_path: Path) -> None:
    rc, _, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", f"unix:{tmp_path}/none.sock",
        "--timeout", "5s",
    )  # fmt: skip
    assert rc == 1
    assert "UNAVAILABLE" in err


async def test_token_over_mutual_tls_and_a_unix_socket(
    kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> None:
    server_pki = issue(tmp_path, "server", "broker.internal")
    client_pki = issue(tmp_path, "client", "client.example")
    tls = server_pki.server_tls(client_ca=client_pki)
    with tempfile.TemporaryDirectory(prefix="tb-") as directory:
        sock = Path(directory) / "b.sock"
        settings = broker_settings(kubernetes_settings, tls=tls, unix_socket=sock)
        async with BrokerServer(settings) as server:
            # The certificate names broker.internal, not 127.0.0.1: --server-name checks it.
            common = ("token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", server.address)
            trust = ("--cacert", str(server_pki.ca_file), "--server-name", "broker.internal")
            client = ("--cert", str(client_pki.cert), "--key", str(client_pki.key))
            rc, out, err = await run_cli(*common, *trust, *client)
            assert rc == 0, err
            assert out.count(".") == 2
            # Without a client certificate the handshake fails.
            rc, _, err = await run_cli(*common, *trust, "--timeout", "5s")
            assert rc == 1
            assert "UNAVAILABLE" in err
            # The unix socket is plaintext: file permissions decide who connects.
            rc, out, err = await run_cli(
                "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", f"unix:{sock}"
            )
            assert rc == 0, err
            assert out.count(".") == 2


# --- serve --------------------------------------------------------------------------------------


async def test_serve_process_bad_config_exits_non_zero(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("log:\n  levle: debug\n")
    rc, _, err = await run_cli("serve", "--config", str(config))
    assert rc == 2
    assert "log.levle" in err
    assert "Traceback" not in err


async def test_serve_process_refuses_plaintext_on_all_interfaces(kubeconfig: Path) -> None:
    rc, _, err = await run_cli("serve", "--listen", "0.0.0.0:0", "--kubeconfig", str(kubeconfig))
    assert rc == 2
    assert "plaintext" in err
    assert "Traceback" not in err


async def test_serve_process_serves_then_exits_cleanly_on_sigterm(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    config = serve_config(
        tmp_path / "config.yaml", kubeconfig, log={"format": "json", "level": "debug"}
    )
    process: Process = await spawn("serve", "--config", str(config))
    index = await process.wait_for("token broker serving", stream="stderr")
    ready = json.loads(process.stderr[index])
    assert ready["level"] == "info"
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", ready["listen"], "--plaintext"
    )
    assert rc == 0, err
    assert await process.terminate() == 0
    logs = [json.loads(line) for line in process.stderr]
    messages = [entry["message"] for entry in logs]
    assert "received SIGTERM" in messages
    assert "stopped" in messages
    # Tokens never reach the log, even at debug level.
    assert out not in "".join(process.stderr)
    assert "eyJ" not in "".join(process.stderr)


async def test_serve_process_second_sigterm_cancels_in_flight_calls(
    spawn: Spawn, emulator: Emulator, kubeconfig: Path, tmp_path: Path
) -> None:
    emulator.faults.latency = 600.0  # the call stays in flight until cancelled
    # Far longer than the test's safety timeouts: only the second signal ends it.
    config = serve_config(
        tmp_path / "config.yaml", kubeconfig, server={"shutdownGraceSeconds": 3600}
    )
    process = await spawn("serve", "--config", str(config))
    ready = json.loads(process.stderr[await process.wait_for("serving", stream="stderr")])
    call = asyncio.ensure_future(
        run_cli("token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", ready["listen"],
                "--plaintext", "--timeout", "0")
    )  # fmt: skip
    while emulator.in_flight == 0:
        assert not call.done(), call.result()
        await asyncio.sleep(0.01)
    process.proc.send_signal(signal.SIGTERM)
    await process.wait_for("received SIGTERM", stream="stderr")
    assert await process.terminate() == 0  # the second SIGTERM
    rc, _, err = await call
    assert rc == 1
    assert "UNAVAILABLE" in err or "CANCELLED" in err
    assert any("cancelling in-flight calls" in line for line in process.stderr)


async def readyz(admin_listen: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{admin_listen}/readyz") as response,
    ):
        return response.status, await response.text()


async def health_status(address: str) -> set[int]:
    """The gRPC health statuses of "" and the broker's service, on a new connection."""
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)).status
            for name in ("", SERVICE_NAME)
        }


def shutdown_config(tmp_path: Path, kubeconfig: Path, delay: float) -> Path:
    return serve_config(
        tmp_path / "config.yaml", kubeconfig, server={"shutdownDelaySeconds": delay}
    )


async def test_serve_process_shutdown_delay_serves_on_while_not_ready(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    # Far longer than the test's safety timeouts: only the second signal ends the delay.
    process = await spawn("serve", "--config", str(shutdown_config(tmp_path, kubeconfig, 3600)))
    ready = json.loads(process.stderr[await process.wait_for("serving", stream="stderr")])
    address, admin = ready["listen"], ready["admin_listen"]
    for _ in range(600):  # until the first probe has made it ready (bounded)
        if (await readyz(admin))[0] == 200:
            break
        await asyncio.sleep(0.05)
    assert await health_status(address) == {health_pb2.HealthCheckResponse.SERVING}

    process.proc.send_signal(signal.SIGTERM)
    await process.wait_for("not ready; serving on for 3600s", stream="stderr")
    # Out of rotation: probes and load balancers see it at once...
    assert await readyz(admin) == (503, "not ready: shutting down\n")
    assert await health_status(address) == {health_pb2.HealthCheckResponse.NOT_SERVING}
    # ...yet a caller still routed here on a new connection is served.
    rc, out, err = await run_cli(
        "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", address, "--plaintext"
    )
    assert rc == 0, err
    assert claims(out)["sub"] == f"system:serviceaccount:{NAMESPACE}:{SERVICE_ACCOUNT}"
    messages = [json.loads(line)["message"] for line in process.stderr if line.startswith("{")]
    assert "shutting down" not in messages  # the listeners are open still

    assert await process.terminate() == 0  # the second SIGTERM ends the delay
    messages = [json.loads(line)["message"] for line in process.stderr if line.startswith("{")]
    assert "second SIGTERM: cancelling in-flight calls" in messages
    assert messages.index("shutting down") < messages.index("stopped")


async def test_serve_process_shutdown_delay_then_graceful_stop(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    process = await spawn("serve", "--config", str(shutdown_config(tmp_path, kubeconfig, 0.2)))
    await process.wait_for("serving", stream="stderr")
    process.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.proc.wait(), 60) == 0
    await asyncio.gather(*process._readers)
    messages = [json.loads(line)["message"] for line in process.stderr if line.startswith("{")]
    steps = [
        "received SIGTERM",
        "not ready; serving on for 0.2s before closing the listeners",
        "shutting down",
        "stopped",
    ]
    assert [m for m in messages if m in steps] == steps


async def test_serve_process_sighup_rereads_the_api_key_file(
    spawn: Spawn, kubeconfig: Path, tmp_path: Path
) -> None:
    # A caller's key rotated in the mounted Secret: SIGHUP (or the next poll) brings it in.
    keys = tmp_path / "api-keys.yaml"
    new_key = generate_api_key()

    def write_keys(key: str) -> None:
        keys.write_text(yaml.safe_dump({"keys": [{"name": CALLER, "sha256": hash_api_key(key)}]}))

    write_keys(CALLER_KEY)
    config = serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        # Far longer than the test: only SIGHUP re-reads the file.
        authentication={"apiKeys": {"file": str(keys)}, "reloadIntervalSeconds": 3600},
    )
    process = await spawn("serve", "--config", str(config))
    ready = json.loads(process.stderr[await process.wait_for("serving", stream="stderr")])

    async def token(credential: str) -> tuple[int, str]:
        rc, _, err = await run_cli(
            "token", SERVICE_ACCOUNT, "-n", NAMESPACE, "--server", ready["listen"], "--plaintext",
            credential=credential,
        )  # fmt: skip
        return rc, err

    assert (await token(CALLER_KEY))[0] == 0
    write_keys(new_key)
    rc, err = await token(new_key)
    assert rc == 1 and "UNAUTHENTICATED" in err  # not re-read yet

    process.proc.send_signal(signal.SIGHUP)
    await process.wait_for("API key file reloaded", stream="stderr")
    assert (await token(new_key))[0] == 0
    rc, err = await token(CALLER_KEY)
    assert rc == 1 and "UNAUTHENTICATED" in err  # the old key is revoked
    assert await process.terminate() == 0
    logs = "".join(process.stderr)
    assert new_key not in logs and CALLER_KEY not in logs
