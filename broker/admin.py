"""The admin HTTP listener (`admin.listen`, plaintext): /metrics, /healthz, /readyz.

- `GET /metrics`: the broker's own Prometheus registry (text format, or OpenMetrics when the
  scraper asks for it).
- `GET /healthz`: the process is alive and serving: 200 `ok`.
- `GET /readyz`: 200 `ok` when ready (broker.readiness), else 503 with the reason.

Nothing here carries a token or a credential, so it may listen on any address; its own port
keeps it apart from the gRPC listener's TLS. No access log: probes and scrapes come every
few seconds.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from broker.listen_ports import serve_app
from broker.readiness import Readiness

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT = 1.0


class AdminServer:
    """`start()`, then `stop()`."""

    def __init__(self, listen: str, *, registry: CollectorRegistry, readiness: Readiness) -> None:
        self.listen = listen
        self._registry = registry
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        """host:port, with the real port when 0 was asked for."""
        if self._address is None:
            raise RuntimeError("the admin listener is not started")
        return self._address

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self) -> None:
        """Bind and serve; ConfigError (naming admin.listen) when the address is unusable."""
        self._runner, self._address = await serve_app(
            self.build_app(), self.listen, "admin.listen", shutdown_timeout=_SHUTDOWN_TIMEOUT
        )

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self._registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n", content_type="text/plain")

    async def _readyz(self, request: web.Request) -> web.Response:
        state = await self._readiness.publish()
        if state.ready:
            return web.Response(text="ok\n", content_type="text/plain")
        return web.Response(
            status=503, text=f"not ready: {state.reason}\n", content_type="text/plain"
        )
