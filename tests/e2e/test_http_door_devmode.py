"""Dev mode's HTTP door (`make run`): the banner's commands for it work as pasted — stock
`kubectl create token` with the kubeconfig dev mode writes (HTTPS with a throwaway CA, the dev
API key as its token), and curl with `$API_KEY` — against a real dev-mode broker."""

from __future__ import annotations

import json
from pathlib import Path

import jwt

from tests.e2e.test_new_user_devmode import BIN, paste, start_dev
from tests.support.cli import Spawn


def audiences_of(token: str) -> list[str]:
    return list(jwt.decode(token, options={"verify_signature": False})["aud"])


async def test_stock_kubectl_and_curl_against_the_dev_http_door(
    spawn: Spawn, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  httpListen: 127.0.0.1:0\n", encoding="utf-8")
    process, banner = await start_dev(spawn, "--config", str(config))
    assert banner.value("http door").startswith("https://127.0.0.1:")
    kubectl, export, curl = banner.after("The HTTP door", 3)
    assert kubectl.startswith(f"{BIN / 'kubectl'} --kubeconfig ")
    assert "create token build-robot --audience vault" in kubectl
    run = await paste(kubectl, tmp_path)
    assert run.returncode == 0, run.stderr
    assert audiences_of(run.stdout.strip()) == ["vault"]
    # The refusal path through stock kubectl: a namespace the dev policy does not name.
    run = await paste(kubectl.replace("create token", "create token -n kube-system"), tmp_path)
    assert run.returncode == 1
    assert "is forbidden" in run.stderr
    run = await paste(f"{export}\n{curl}", tmp_path)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["kind"] == "TokenRequest"
    assert audiences_of(body["status"]["token"]) == ["vault"]
    assert "tbk_" not in "".join(process.stdout)


async def test_the_http_door_can_be_turned_off(spawn: Spawn, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("server:\n  httpListen: null\n", encoding="utf-8")
    _, banner = await start_dev(spawn, "--config", str(config))
    assert not any(line.startswith("http door:") for line in banner.lines)
