"""Dev mode's OAuth door is tryable (`make run`): a throwaway JWT issuer, its subject token in
`subject.jwt`, the banner's curl for the token exchange working as pasted — and the user's own
JWT issuers kept when the configuration names some. Against a real dev-mode broker."""

from __future__ import annotations

import asyncio
import json
import re
import stat
from pathlib import Path

import jwt

from broker.dev_issuer import AUDIENCE, ISSUER, SUBJECT, SUBJECT_TOKEN_SECONDS
from broker.http_oauth import GRANT_TYPE, TOKEN_TYPE_JWT
from tests.e2e.test_new_user_devmode import Banner, paste, start_dev
from tests.support import jwt_issuer
from tests.support.cli import Process, Spawn
from tests.support.suite_secrets import SUITE


def dev_config(path: Path, extra: str = "") -> Path:
    path.write_text("server:\n  httpListen: 127.0.0.1:0\n" + extra, encoding="utf-8")
    return path


async def audit_lines(audit: Path, count: int) -> list[dict[str, object]]:
    """The audit file's lines once it has `count` (bounded wait: the test must not hang)."""

    async def written() -> list[dict[str, object]]:
        while True:
            lines = audit.read_text().splitlines() if audit.exists() else []
            if len(lines) >= count:
                return [json.loads(line) for line in lines]
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(written(), 30)


def assert_not_in_output(process: Process, secret: str) -> None:
    output = "".join(process.stdout) + "".join(process.stderr)
    assert secret not in output
    assert secret.rsplit(".", 1)[-1] not in output  # nor its signature


async def test_the_dev_subject_token_gets_a_token_through_the_oauth_door(
    spawn: Spawn, tmp_path: Path
) -> None:
    process, banner = await start_dev(spawn, "--config", str(dev_config(tmp_path / "c.yaml")))
    issuer_line = banner.line_with("jwt issuer:")
    assert ISSUER in issuer_line and f"`{SUBJECT}`" in issuer_line
    match = re.search(r"(/\S+/subject\.jwt)", issuer_line)
    assert match, issuer_line
    subject_file = Path(match.group(1))
    dev_dir = subject_file.parent
    assert dev_dir == Path(banner.value("kubeconfig")).parent
    subject_token = subject_file.read_text(encoding="ascii")
    SUITE.tokens.add(subject_token)  # the suite-wide scan looks for it too
    # A credential: never printed (the banner names the file), never in the logs.
    assert_not_in_output(process, subject_token)
    # Re-minted at each start, for SUBJECT, by the dev issuer, valid an hour, no newline.
    assert subject_token == subject_token.strip()
    claims = jwt.decode(subject_token, options={"verify_signature": False})
    assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, AUDIENCE, SUBJECT)
    assert claims["exp"] - claims["iat"] == SUBJECT_TOKEN_SECONDS
    # The key set verifies it; the private key and the token are this user's only.
    jwks = json.loads((dev_dir / "jwt-issuer" / "jwks.json").read_text())
    [jwk] = jwks["keys"]
    assert "d" not in jwk
    key = jwt.PyJWK(jwk).key
    jwt.decode(subject_token, key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    for private in (dev_dir / "jwt-issuer" / "signing-key.pem", subject_file):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private

    # The banner's exchange, as pasted: the subject token read from its file.
    [exchange] = [line for line in banner.after("The HTTP door", 4) if "/oauth2/token" in line]
    assert f"--data-urlencode subject_token@{subject_file}" in exchange
    assert f"--cacert {dev_dir / 'http-tls' / 'ca.crt'}" in exchange
    assert f"grant_type={GRANT_TYPE}" in exchange
    assert f"subject_token_type={TOKEN_TYPE_JWT}" in exchange
    run = await paste(exchange, tmp_path)
    assert run.returncode == 0, run.stderr
    answer = json.loads(run.stdout)
    assert answer["token_type"] == "N_A" and answer["issued_token_type"] == TOKEN_TYPE_JWT
    issued = jwt.decode(answer["access_token"], options={"verify_signature": False})
    assert issued["aud"] == ["vault"]
    assert issued["sub"] == "system:serviceaccount:demo:build-robot"

    # Refused: a namespace the dev policy does not name, with the policy's reason.
    run = await paste(
        exchange.replace("demo:build-robot", "kube-system:default") + " --fail-with-body",
        tmp_path,
    )
    assert run.returncode == 22
    refusal = json.loads(run.stdout)
    assert refusal["error"] == "invalid_target"
    assert "no policy rule allows" in refusal["error_description"]

    allowed, denied = await audit_lines(Path(banner.value("audit")), 2)
    for line in (allowed, denied):
        assert line["door"] == "http-oauth"
        assert (line["authMethod"], line["user"], line["issuer"]) == ("jwt", SUBJECT, ISSUER)
    assert (allowed["decision"], allowed["rule"]) == ("allowed", "dev-everything")
    assert (denied["decision"], denied["reason"]) == ("denied", "NO_MATCHING_RULE")
    assert_not_in_output(process, subject_token)
    assert await process.terminate() == 0


async def test_the_users_own_jwt_issuers_are_kept(spawn: Spawn, tmp_path: Path) -> None:
    signer = jwt_issuer.Signer(jwt_issuer.rsa_key(), "user-key", "RS256")
    jwks = jwt_issuer.write_jwks(tmp_path / "jwks.json", signer.jwk())
    config = dev_config(
        tmp_path / "c.yaml",
        "authentication:\n  jwt:\n    issuers:\n"
        f"      - issuer: {jwt_issuer.ISSUER}\n"
        f"        audiences: [{jwt_issuer.AUDIENCE}]\n"
        f"        jwksFile: {jwks}\n",
    )
    process, banner = await start_dev(spawn, "--config", str(config))
    dev_dir = Path(banner.value("kubeconfig")).parent
    # No dev issuer: no line, no files, no exchange command.
    assert not any(line.startswith("jwt issuer:") for line in banner.lines)
    assert not (dev_dir / "subject.jwt").exists() and not (dev_dir / "jwt-issuer").exists()
    assert "/oauth2/token -d" not in "\n".join(banner.lines)

    async def exchange(token: str, name: str) -> dict[str, str]:
        SUITE.tokens.add(token)
        token_file = tmp_path / name
        token_file.write_text(token, encoding="ascii")
        url = Banner.value(banner, "http door")
        command = (
            f"curl -s --cacert {dev_dir / 'http-tls' / 'ca.crt'} {url}/oauth2/token"
            f" -d grant_type={GRANT_TYPE} -d subject_token_type={TOKEN_TYPE_JWT}"
            f" --data-urlencode subject_token@{token_file}"
            " -d resource=system:serviceaccount:demo:build-robot"
        )
        run = await paste(command, tmp_path)
        assert run.returncode == 0, run.stderr
        answer: dict[str, str] = json.loads(run.stdout)
        return answer

    # The user's issuer authenticates its caller (the dev policy names no rule for it:
    # refused by the policy, not by authentication).
    answer = await exchange(signer.mint(), "user.jwt")
    assert answer["error"] == "invalid_target"
    assert f"'jwt:{jwt_issuer.ISSUER}#ci/runner'" in answer["error_description"]
    # A token of the dev issuer's name is not accepted: that issuer is not configured.
    forged = jwt_issuer.Signer(jwt_issuer.rsa_key(), "dev", "RS256").mint(
        iss=ISSUER, aud=AUDIENCE, sub=SUBJECT
    )
    answer = await exchange(forged, "forged.jwt")
    assert answer["error"] == "invalid_request"
    assert await process.terminate() == 0
