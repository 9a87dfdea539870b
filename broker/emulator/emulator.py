"""Emulator: an HTTPS kube-apiserver stand-in for the TokenRequest API, in-process.

    async with Emulator(seed={...}) as emu:
        emu.write_kubeconfig(path, user_token="...")
        ...

State (objects, users, grants, faults, the request log) lives on the instance and can be
changed while it serves. The CA, serving certificate, signing key and port are kept across
stop()/start(), so a restarted emulator is the "same" API server to its clients.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import socket
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from aiohttp import web

from broker.emulator.app import ApiServer
from broker.emulator.auth import ALL, TOKEN_RESOURCE, AccessControl, UserInfo
from broker.emulator.config import EmulatorConfig
from broker.emulator.faults import Faults
from broker.emulator.pki import ServingPKI, generate_pki, server_ssl_context
from broker.emulator.records import RecordedRequest, RequestLog
from broker.emulator.seed import apply_seed, load_seed
from broker.emulator.store import ObjectStore
from broker.emulator.tokens import TokenSigner, generate_key, load_key, shared_key

_SHUTDOWN_TIMEOUT = 2.0  # in-flight handlers get this long; injected latency ends at once


class Emulator:
    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        seed: dict[str, Any] | str | Path | None = None,
        **overrides: Any,
    ) -> None:
        cfg = config if config is not None else EmulatorConfig()
        if overrides:
            # Audiences that were defaulted from the old issuer follow a new one.
            defaulted = cfg.api_audiences == [cfg.issuer] and "api_audiences" not in overrides
            if "issuer" in overrides and defaulted:
                overrides["api_audiences"] = []
            cfg = dataclasses.replace(cfg, **overrides)
        if seed is not None:
            cfg = dataclasses.replace(cfg, seed=seed)
        self.config = cfg
        self.store = ObjectStore()
        self.access = AccessControl()
        self.faults = Faults()
        self._log = RequestLog()
        apply_seed(load_seed(cfg.seed), self.store, self.access)

        self._port = cfg.port
        self._signer: TokenSigner | None = None
        self._pki: ServingPKI | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None

    def __repr__(self) -> str:
        where = self.url if self.running else "stopped"
        return f"Emulator({where})"

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Serve HTTPS on config.host:port (port 0: a free one, then kept for restarts)."""
        if self._runner is not None:
            raise RuntimeError("the emulator is already running")
        if self._signer is None:
            # RSA key generation takes ~0.1 s: keep it off the event loop.
            self._signer = await asyncio.to_thread(self._make_signer)
        if self._pki is None:
            self._pki = generate_pki(self.config.host)
            self._tmp = tempfile.TemporaryDirectory(prefix="token-broker-emulator-")
            (Path(self._tmp.name) / "ca.crt").write_bytes(self._pki.ca_cert_pem)

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.config.host, self._port))
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]

        self._closing = asyncio.Event()
        server = ApiServer(
            config=self.config,
            store=self.store,
            access=self.access,
            faults=self.faults,
            log=self._log,
            signer=self.signer,
            base_url=lambda: self.url,
            closing=self._closing,
        )
        runner = web.AppRunner(
            server.build_app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=server_ssl_context(self._pki))
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving (idempotent). Open connections are closed; state is kept."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # --- where and how to reach it --------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the emulator has not been started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}"

    @property
    def ca_cert_pem(self) -> bytes:
        if self._pki is None:
            raise RuntimeError("the emulator has not been started")
        return self._pki.ca_cert_pem

    @property
    def directory(self) -> Path:
        """The emulator's own temporary directory (its CA certificate), removed with it."""
        if self._tmp is None:
            raise RuntimeError("the emulator has not been started")
        return Path(self._tmp.name)

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    def write_kubeconfig(
        self,
        path: Path,
        *,
        user_token: str | None = None,
        user_exec: dict[str, Any] | None = None,
        context: str = "emulator",
        namespace: str | None = None,
    ) -> Path:
        """A kubeconfig for this emulator (file mode 0600) whose user is that bearer token, or
        a credential plugin (`user_exec`: the kubeconfig's `users[].user.exec`)."""
        if (user_token is None) == (user_exec is None):
            raise ValueError("a kubeconfig user is a bearer token or a credential plugin")
        user: dict[str, Any] = {"token": user_token} if user_exec is None else {"exec": user_exec}
        ctx: dict[str, str] = {"cluster": context, "user": context}
        if namespace:
            ctx["namespace"] = namespace
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": context,
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_cert_pem).decode(),
                    },
                }
            ],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
            "preferences": {},
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        return path

    # --- identities and permissions -------------------------------------------------------

    def add_user(
        self, token: str, username: str, groups: list[str] | None = None, *, admin: bool = False
    ) -> UserInfo:
        """Accept `Authorization: Bearer <token>` as `username` (in `groups`)."""
        return self.access.add_user(token, username, groups or [], admin=admin)

    def remove_user(self, token: str) -> None:
        """Stop accepting a bearer token (401 from then on)."""
        self.access.remove_user(token)

    def allow(
        self,
        username: str,
        namespace: str,
        resource_names: list[str] | None = None,
        *,
        resources: tuple[str, ...] = (TOKEN_RESOURCE,),
        verbs: tuple[str, ...] = ("create",),
    ) -> None:
        """Let `username` create serviceaccounts/token in `namespace` ("*": everywhere),
        optionally only for `resource_names`."""
        self.access.allow(
            user=username,
            namespaces=[namespace or ALL],
            resources=resources,
            verbs=verbs,
            resource_names=resource_names or [],
        )

    def revoke(self, username: str) -> None:
        """Drop every grant of `username` (403 from then on, unless admin)."""
        self.access.revoke(user=username)

    # --- what happened --------------------------------------------------------------------

    @property
    def token_requests(self) -> list[RecordedRequest]:
        """Every authenticated request to the token endpoint, in arrival order."""
        return self._log.requests

    @property
    def token_request_count(self) -> int:
        return len(self._log.requests)

    @property
    def in_flight(self) -> int:
        return self._log.in_flight

    @property
    def in_flight_max(self) -> int:
        return self._log.in_flight_max

    def reset_counters(self) -> None:
        """Forget recorded token requests and the in-flight maximum."""
        self._log.reset()

    # --- keys -----------------------------------------------------------------------------

    def _make_signer(self) -> TokenSigner:
        cfg = self.config
        if cfg.signing_key_pem is not None:
            key = load_key(cfg.signing_key_pem, cfg.signing_algorithm)
        elif cfg.reuse_signing_key:
            key = shared_key(cfg.signing_algorithm)
        else:
            key = generate_key(cfg.signing_algorithm)
        return TokenSigner(key, cfg.signing_algorithm, cfg.issuer)

    @property
    def signer(self) -> TokenSigner:
        if self._signer is None:
            self._signer = self._make_signer()
        return self._signer

    def jwks(self) -> dict[str, Any]:
        """The JWK set served at /openid/v1/jwks."""
        return self.signer.jwks()
