"""`token-broker serve --dev`: the broker against an in-process API-server emulator.

INSECURE by design: plaintext gRPC on loopback, a throwaway CA and kubeconfig in a temporary
directory, tokens signed by the emulator's own key (no real cluster accepts them).

Callers still authenticate and the policy still decides, explicitly: a unix socket in the
temporary directory (mode 0600: this user only) gives the identity `dev`, a random API key
written next to it gives the identity `dev` over TCP, and `broker/dev-policy.yaml` (a
permissive policy for the seed's namespaces) is in force unless --config names another.

For a person at a terminal (what `make run` starts):
- the default ports (gRPC 50051, admin 8082) move to free ones when they are busy (a second
  `make run`, another service), and the banner says so; an address the user chose stays
  strict (a busy one is an error naming its flag);
- audit lines go to `audit.jsonl` in the temporary directory (named in the banner) unless the
  configuration chooses an audit sink, so the text logs on the terminal are not interleaved
  with JSON;
- the banner's commands are ready to paste: the tools by their full path (after `make run`
  they are in .venv/bin, not on PATH), the API key exported from its file (never printed),
  and a kubeconfig whose user gets its token from the broker through the kubectl credential
  plugin (`kubectl.kubeconfig`: kubectl acts as demo/build-robot on the emulator);
- the HTTP door (broker.http_door) on 127.0.0.1:8444 (moved when busy; `server.httpListen`
  chooses, null turns it off), HTTPS with a throwaway CA of its own (kubectl sends no
  credentials over plain http://) unless `server.tls` or `server.httpTls` is configured, and
  a kubeconfig for it (`http-door.kubeconfig`: the dev API key as its token) so that stock
  `kubectl create token` works against the broker;
- unless the configuration names JWT issuers of its own, a throwaway JWT issuer
  (broker.dev_issuer) and a subject token of it in `subject.jwt`, so that the OAuth token
  exchange (`POST /oauth2/token`) can be tried: the dev policy lets its subject have tokens.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from broker.authn_apikeys import generate_api_key, hash_api_key
from broker.config import Settings, TLSSettings, split_host_port
from broker.dev_issuer import ISSUER as DEV_JWT_ISSUER
from broker.dev_issuer import SUBJECT as DEV_JWT_SUBJECT
from broker.dev_issuer import SUBJECT_TOKEN_SECONDS as DEV_JWT_SECONDS
from broker.dev_issuer import DevIssuer, issuer_settings, write_dev_issuer
from broker.emulator import Emulator, generate_pki
from broker.http_oauth import GRANT_TYPE, TOKEN_TYPE_JWT
from broker.http_oauth import ROUTE as OAUTH_ROUTE
from broker.listen_ports import bind_error
from broker.policy import DEV_POLICY_FILE
from broker.server import BrokerServer, serve_until_signal, signals_while_starting

DEV_SEED = Path(__file__).parent / "emulator" / "dev-seed.yaml"
BROKER_IDENTITY = "system:serviceaccount:token-broker:token-broker"
# Shown in the banner's example commands (and the kubectl kubeconfig's user).
EXAMPLE_NAMESPACE = "demo"
EXAMPLE_SERVICE_ACCOUNT = "build-robot"
# The identity of dev-mode callers (the dev policy's subjects name it).
DEV_IDENTITY = "dev"
# Files in the temporary directory.
API_KEY_FILE = "api-key"
AUDIT_FILE = "audit.jsonl"
KUBECTL_KUBECONFIG = "kubectl.kubeconfig"
HTTP_KUBECONFIG = "http-door.kubeconfig"
HTTP_TLS_DIRECTORY = "http-tls"
DEV_HTTP_LISTEN = "127.0.0.1:8444"


def broker_user_token(seed: dict[str, Any]) -> str:
    """The seed's bearer token for the broker's identity (else its first user's)."""
    users = seed.get("users") or []
    for user in users:
        if user.get("name") == BROKER_IDENTITY:
            return str(user["token"])
    if users:
        return str(users[0]["token"])
    raise ValueError("the dev seed defines no user for the broker")


@dataclass(frozen=True)
class MovedListener:
    """A default listen address that was busy, and the flag that chooses another."""

    key: str
    busy: str
    flag: str


def free_default_ports(settings: Settings) -> tuple[Settings, tuple[MovedListener, ...]]:
    """The settings with each *default* listen address that is busy (server.listen, 50051;
    admin.listen, 8082) moved to a free port on the same host. Addresses set in the file, the
    environment or a flag are kept: a busy one fails the start, naming its flag."""
    server, admin = settings.server, settings.admin
    moved: list[MovedListener] = []
    if "listen" not in server.model_fields_set and server.listen and bind_error(server.listen):
        moved.append(MovedListener("server.listen", server.listen, "--listen"))
        server = server.model_copy(update={"listen": _any_port(server.listen)})
    if "listen" not in admin.model_fields_set and admin.listen and bind_error(admin.listen):
        moved.append(MovedListener("admin.listen", admin.listen, "--admin-listen"))
        admin = admin.model_copy(update={"listen": _any_port(admin.listen)})
    if not moved:
        return settings, ()
    return settings.model_copy(update={"server": server, "admin": admin}), tuple(moved)


def dev_http_door(
    settings: Settings, workdir: Path
) -> tuple[Settings, tuple[MovedListener, ...], Path | None]:
    """The settings with the HTTP door on (DEV_HTTP_LISTEN, moved when busy) unless the user
    chose its address (or turned it off), HTTPS with a throwaway CA written in `workdir`
    unless TLS is configured; what moved, and the CA file (None: not ours, or no door)."""
    server = settings.server
    moved: tuple[MovedListener, ...] = ()
    listen = server.http_listen
    if "http_listen" not in server.model_fields_set:
        listen = DEV_HTTP_LISTEN
        if bind_error(listen):
            moved = (MovedListener("server.httpListen", listen, "--http-listen"),)
            listen = _any_port(listen)
    if listen is None:
        return settings, (), None
    update: dict[str, Any] = {"http_listen": listen}
    ca_file = None
    if server.tls is None and server.http_tls is None:
        pki = generate_pki("127.0.0.1")
        directory = workdir / HTTP_TLS_DIRECTORY
        directory.mkdir(mode=0o700)
        files = {"tls.crt": pki.cert_pem, "tls.key": pki.key_pem, "ca.crt": pki.ca_cert_pem}
        for name, data in files.items():
            (directory / name).touch(mode=0o600)
            (directory / name).write_bytes(data)
        update["http_tls"] = TLSSettings(
            cert_file=directory / "tls.crt", key_file=directory / "tls.key"
        )
        ca_file = directory / "ca.crt"
    return (
        settings.model_copy(update={"server": server.model_copy(update=update)}),
        moved,
        ca_file,
    )


def write_http_kubeconfig(path: Path, url: str, ca_file: Path, api_key: str) -> Path:
    """A kubeconfig for stock kubectl against the broker's HTTP door, as the dev caller (the
    API key as its bearer token; mode 0600)."""
    name = "token-broker-dev"
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": url, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": name, "user": {"token": api_key}}],
        "contexts": [
            {
                "name": name,
                "context": {"cluster": name, "user": name, "namespace": EXAMPLE_NAMESPACE},
            }
        ],
        "current-context": name,
        "preferences": {},
    }
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def _any_port(listen: str) -> str:
    host, _ = split_host_port(listen)
    return f"{host}:0"


def wants_dev_issuer(settings: Settings) -> bool:
    """Dev mode runs its own JWT issuer only when the configuration names none: the user's
    issuers are kept as they are, alone."""
    return not settings.authentication.jwt.issuers


def dev_settings(
    settings: Settings, workdir: Path, api_key: str, dev_issuer: DevIssuer | None = None
) -> Settings:
    """The given settings pointed at the emulator, plaintext allowed (on loopback only), with
    the dev identities, the dev JWT issuer (when given), and (unless one is configured) the
    dev policy, and (unless an audit sink is configured) the audit lines in `workdir`."""
    audit_chosen = bool({"sink", "file"} & settings.audit.model_fields_set)
    data = settings.model_dump()
    server = data["server"]
    server["allow_plaintext"] = True
    if server["unix_socket"] is None:
        server.update(unix_socket=workdir / "broker.sock", unix_socket_mode=0o600)
    authentication = data["authentication"]
    authentication["unix_socket"] = {"identity": DEV_IDENTITY}
    dev_key = {"name": DEV_IDENTITY, "sha256": hash_api_key(api_key)}
    authentication["api_keys"]["keys"] = [*authentication["api_keys"]["keys"], dev_key]
    if dev_issuer is not None:
        jwt_issuers = authentication["jwt"]["issuers"]
        authentication["jwt"]["issuers"] = [*jwt_issuers, issuer_settings(dev_issuer)]
    if data["policy"]["file"] is None:
        data["policy"]["file"] = DEV_POLICY_FILE
    if not audit_chosen:
        # Not on stdout: JSON lines between the text logs are hard to read at a terminal.
        data["audit"].update(sink="file", file=workdir / AUDIT_FILE)
    data["kubernetes"].update(mode="kubeconfig", kubeconfig=workdir / "kubeconfig", context=None)
    # model_validate, not Settings(...): the environment was already applied to `settings`.
    return Settings.model_validate(data)


# --- the commands the banner prints ------------------------------------------------------------


def _bin_dir() -> Path:
    """Where this Python's scripts are (.venv/bin after `make run`): not resolved, so a venv's
    python symlink still names the venv."""
    return Path(sys.executable).absolute().parent


def _tool(name: str) -> str | None:
    """A tool by the path to paste: this Python's bin directory (the venv), else the PATH."""
    here = _bin_dir() / name
    if here.is_file():
        return str(here)
    return name if shutil.which(name) else None


def token_broker_command() -> list[str]:
    """How to run this token-broker: the venv's script, else this Python with `-m broker`."""
    script = _bin_dir() / "token-broker"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "broker"]


def write_kubectl_kubeconfig(
    path: Path, emulator: Emulator, unix_socket: Path, cache_dir: Path
) -> Path:
    """A kubeconfig for kubectl against the emulator as demo/build-robot, whose token comes
    from this broker through the credential plugin (`token-broker exec-credential`, over the
    unix socket: no API key needed), cached in `cache_dir`."""
    command = token_broker_command()
    plugin = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": command[0],
        "args": [
            *command[1:],
            "exec-credential",
            EXAMPLE_SERVICE_ACCOUNT,
            "-n",
            EXAMPLE_NAMESPACE,
            "--server",
            f"unix:{unix_socket}",
            "--cache-dir",
            str(cache_dir),
        ],
        "interactiveMode": "Never",
        "provideClusterInfo": False,
    }
    return emulator.write_kubeconfig(
        path,
        user_exec=plugin,
        context=f"{EXAMPLE_NAMESPACE}-{EXAMPLE_SERVICE_ACCOUNT}",
        namespace=EXAMPLE_NAMESPACE,
    )


def banner(
    server: BrokerServer,
    emulator: Emulator,
    workdir: Path,
    moved: tuple[MovedListener, ...] = (),
    http_ca: Path | None = None,
    subject_token_file: Path | None = None,
) -> str:
    settings = server.settings
    token_broker = shlex.join(token_broker_command())
    token = f"{token_broker} token {EXAMPLE_SERVICE_ACCOUNT} -n {EXAMPLE_NAMESPACE}"
    key_file = workdir / API_KEY_FILE
    commands = [f"{token} --server unix:{server.unix_socket}"]
    grpcurl = _tool("grpcurl")
    grpcurl_cmd = shlex.quote(grpcurl or "grpcurl")
    grpc_lines = [f"{grpcurl_cmd} -plaintext -unix {server.unix_socket} list"]
    if settings.server.listen:
        plaintext = " --plaintext" if settings.server.tls is None else ""
        commands.append(
            f"{token} --server {server.address}{plaintext} --credential-file {key_file}"
            " --audience vault"
        )
        request = '{"namespace":"demo","service_account":"build-robot"}'
        grpc_lines += [
            f'export API_KEY="$(cat {key_file})"',
            f"{grpcurl_cmd}{' -plaintext' if plaintext else ''}"
            f' -H "authorization: Bearer $API_KEY" -d {shlex.quote(request)}'
            f" {server.address} tokenbroker.v1.TokenBrokerService/CreateToken",
        ]
    admin = server.admin_url
    admin_where = f"{admin} (/metrics, /healthz, /readyz)" if admin else "- (admin.listen unset)"
    admin_lines = [f"  curl {admin}/metrics", f"  curl {admin}/readyz"] if admin is not None else []
    audit = settings.audit
    audit_where = str(audit.file) if audit.sink == "file" else "stdout"
    kubectl = _tool("kubectl")
    kubectl_cmd = shlex.quote(kubectl or "kubectl")
    kubeconfig_for_kubectl = workdir / KUBECTL_KUBECONFIG
    http_url = server.http_url
    http_lines: list[str] = []
    if http_url is not None:
        token_path = (
            f"/api/v1/namespaces/{EXAMPLE_NAMESPACE}/serviceaccounts/"
            f"{EXAMPLE_SERVICE_ACCOUNT}/token"
        )
        body = '{"spec":{"audiences":["vault"]}}'
        cacert = f" --cacert {http_ca}" if http_ca is not None else ""
        http_lines = [
            "The HTTP door (stock kubectl, curl, OAuth token exchange):",
            *(
                [
                    f"  {kubectl_cmd} --kubeconfig {workdir / HTTP_KUBECONFIG} create token"
                    f" {EXAMPLE_SERVICE_ACCOUNT} --audience vault"
                ]
                if http_ca is not None
                else []
            ),
            f'  export API_KEY="$(cat {key_file})"',
            f'  curl{cacert} -H "Authorization: Bearer $API_KEY"'
            f" -H 'Content-Type: application/json' -d {shlex.quote(body)}"
            f" {http_url}{token_path}",
        ]
        if subject_token_file is not None:
            # The subject token goes from its file into the form: not printed, not in argv.
            resource = f"system:serviceaccount:{EXAMPLE_NAMESPACE}:{EXAMPLE_SERVICE_ACCOUNT}"
            http_lines.append(
                f"  curl{cacert} {http_url}{OAUTH_ROUTE} -d grant_type={GRANT_TYPE}"
                f" -d subject_token_type={TOKEN_TYPE_JWT}"
                f" --data-urlencode subject_token@{subject_token_file}"
                f" -d resource={resource} -d audience=vault"
            )

    def moved_note(key: str) -> list[str]:
        return [
            f"            ({m.busy} was in use: a free port instead; {m.flag} HOST:PORT chooses)"
            for m in moved
            if m.key == key
        ]

    rule = "=" * 78
    return "\n".join(
        [
            rule,
            "  INSECURE DEV MODE: plaintext gRPC, in-process Kubernetes API emulator.",
            "  Tokens come from the emulator, not a real cluster. Never use in production.",
            rule,
            f"broker:     {server.address if settings.server.listen else '-'}"
            f" and unix:{server.unix_socket}",
            *moved_note("server.listen"),
            f"callers:    identity `{DEV_IDENTITY}`: the unix socket, or the API key in {key_file}",
            *(
                [
                    f"jwt issuer: {DEV_JWT_ISSUER} (dev only): `{DEV_JWT_SUBJECT}`'s JWT in"
                    f" {subject_token_file} (valid {DEV_JWT_SECONDS // 60} min from the start),"
                    " for the OAuth door"
                ]
                if subject_token_file is not None
                else []
            ),
            *(
                [f"http door:  {http_url} (Kubernetes TokenRequest; OAuth at /oauth2/token)"]
                if http_url is not None
                else []
            ),
            *moved_note("server.httpListen"),
            f"admin:      {admin_where}",
            *moved_note("admin.listen"),
            f"audit:      {audit_where} (one JSON line per decision; the logs are on stderr)",
            f"policy:     {settings.policy.file}",
            f"emulator:   {emulator.url} (CA {emulator.ca_file})",
            f"kubeconfig: {workdir / 'kubeconfig'} (the broker's own identity)",
            f"seed:       {DEV_SEED}",
            f"tools:      {_bin_dir()} (`make run` installs token-broker there, not on PATH)",
            "",
            "Get a token (without --audience: for the API server's own audiences):",
            *(f"  {c}" for c in commands),
            f"kubectl as {EXAMPLE_NAMESPACE}/{EXAMPLE_SERVICE_ACCOUNT}, its token from the broker"
            " (kubectl credential plugin):",
            f"  KUBECONFIG={kubeconfig_for_kubectl} {kubectl_cmd} get serviceaccounts",
            *_missing("kubectl", kubectl),
            *http_lines,
            "gRPC with grpcurl (server reflection is on):",
            *(f"  {g}" for g in grpc_lines),
            *_missing("grpcurl", grpcurl),
            "Metrics and health:",
            *admin_lines,
            "",
            "Ctrl-C (SIGINT) or SIGTERM stops the broker and the emulator.",
            rule,
        ]
    )


def _missing(name: str, found: str | None) -> list[str]:
    if found is not None:
        return []
    return [f"  ({name} is not installed: `make venv` puts it in .venv/bin)"]


async def run_dev(settings: Settings, out: TextIO | None = None) -> int:
    """Emulator + broker until SIGTERM/SIGINT; the exit status."""
    stream = out if out is not None else sys.stdout
    seed = await asyncio.to_thread(_read_seed)
    settings, moved = await asyncio.to_thread(free_default_ports, settings)
    workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="token-broker-dev-"))
    try:
        emulator = Emulator(seed=seed, host="127.0.0.1", port=0)
        await emulator.start()
        try:
            await asyncio.to_thread(
                emulator.write_kubeconfig,
                workdir / "kubeconfig",
                user_token=broker_user_token(seed),
            )
            api_key = generate_api_key()
            await asyncio.to_thread(_write_private, workdir / API_KEY_FILE, api_key)
            settings, http_moved, http_ca = await asyncio.to_thread(
                dev_http_door, settings, workdir
            )
            moved = (*moved, *http_moved)
            issuer = None
            if wants_dev_issuer(settings):
                issuer = await asyncio.to_thread(write_dev_issuer, workdir)
            server = BrokerServer(dev_settings(settings, workdir, api_key, issuer))
            with signals_while_starting() as started:
                await server.start()
                assert server.unix_socket is not None  # dev mode always has one
                await asyncio.to_thread(
                    write_kubectl_kubeconfig,
                    workdir / KUBECTL_KUBECONFIG,
                    emulator,
                    server.unix_socket,
                    workdir / "exec-credential-cache",
                )
                if server.http_url is not None and http_ca is not None:
                    await asyncio.to_thread(
                        write_http_kubeconfig,
                        workdir / HTTP_KUBECONFIG,
                        server.http_url,
                        http_ca,
                        api_key,
                    )
                subject_token_file = issuer.subject_token_file if issuer is not None else None
                stream.write(
                    banner(server, emulator, workdir, moved, http_ca, subject_token_file) + "\n"
                )
                stream.flush()
                await serve_until_signal(server, started)
        finally:
            await emulator.stop()
    finally:
        await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)
    return 0


def _read_seed() -> dict[str, Any]:
    data = yaml.safe_load(DEV_SEED.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{DEV_SEED}: top level must be a mapping")
    return data


def _write_private(path: Path, text: str) -> None:
    path.touch(mode=0o600)
    path.write_text(text + "\n", encoding="utf-8")
