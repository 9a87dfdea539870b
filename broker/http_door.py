"""The HTTP door (`server.httpListen`): the Kubernetes-compatible TokenRequest endpoint
(broker.http_kubernetes) and OAuth 2.0 token exchange (broker.http_oauth) over HTTPS, thin
adapters around the same request path as gRPC (broker.request_path).

    POST /api/v1/namespaces/{namespace}/serviceaccounts/{name}/token   (handler kubernetes-token)
    POST /oauth2/token                                                  (handler oauth-token)
    anything else: 404 (Status), a wrong method 405 with Allow         (handler other)

What this module does for every request, and the gRPC door's hardening it keeps:

- TLS from `server.tls`, the same files as gRPC, followed the same way: each new connection's
  handshake gets the certificate in force (a renewal is picked up without a restart; open
  connections keep theirs). With `clientCaFile`, client certificates are verified against it
  (`requireClientCert`: required, else optional) and the verified certificate feeds the same
  mTLS identity code as gRPC (certificate field, SPIFFE matching). Plaintext only where
  `server.listen` may be plaintext (dev mode, or loopback with `allowPlaintext`).
- Bounded input: request line and each header at most 8 KiB, at most 100 headers (aiohttp's
  parser answers 400 beyond, before any handler), a body of at most 1 MiB (gRPC's receive limit:
  a declared larger one is refused before it is read, 413), received within
  `server.receiveTimeoutSeconds`; the pending-call admission limit, the per-address
  failed-authentication throttle, the default deadline and the audit line's bounds are the
  request path's, as on gRPC.
- The request id: a sane incoming `X-Request-Id` (else a new one), returned as `X-Request-Id`,
  in the access line (logger `broker.access`: method, route, status, latency) and the audit
  line (whose `door` says `http-kubernetes` or `http-oauth`).
- The metrics `http_server_requests_total{handler,method,code}` and
  `http_server_request_duration_seconds{handler,method}` (client_golang promhttp's names; the
  handler label is the route, never the raw path), besides the request path's own
  `token_broker_*`, which are exactly the same whichever door a call came through.
- Never a 500 for bad input, never a stack trace: an unexpected failure is a 500 `InternalError`
  Status with the request id, logged with its frames.

Lifecycle: `start()` binds (SO_REUSEPORT with `serve --workers N`, like gRPC's listener);
`stop(grace)` stops accepting and lets requests in flight finish within `grace` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import tempfile
import time
import traceback
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp import web

from broker import http_kubernetes as kube
from broker import http_oauth as oauth
from broker.apiserver import status as kstatus
from broker.credentials import Credentials
from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.http_errors import retry_after_header
from broker.listen_ports import serve_app
from broker.logs import bind_request_id
from broker.metrics import BrokerMetrics
from broker.reasons import Reason
from broker.request_id import REQUEST_ID_METADATA_KEY, request_id_from
from broker.request_path import (
    DOOR_HTTP_KUBERNETES,
    DOOR_HTTP_OAUTH,
    RequestPath,
    TokenCall,
)
from broker.tls import ServerCertificates, ServerTLSMaterial

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("broker.access")

# gRPC's receive limit (broker.server.MAX_RECEIVE_MESSAGE_BYTES): requests are a few hundred
# bytes.
MAX_BODY_BYTES = 1024 * 1024
MAX_LINE_BYTES = 8190
MAX_HEADERS = 100
LINGERING_SECONDS = 2.0
HANDLER_KUBERNETES = "kubernetes-token"
HANDLER_OAUTH = "oauth-token"
HANDLER_OTHER = "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TOKEN_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token")
_REQUEST_ID_HEADER = "X-Request-Id"
# The reason of a refusal, for clients that branch on it (the ErrorInfo reason on gRPC).
REASON_HEADER = "Token-Broker-Reason"


def _no_deadline() -> float | None:
    # HTTP carries no deadline: the request path's default deadline applies.
    return None


def _too_large() -> kube.StatusRefusal:
    error = kstatus.request_entity_too_large(MAX_BODY_BYTES)
    return kube.StatusRefusal.of(Reason.REQUEST_MALFORMED, error.message, status=error)


async def read_body(request: web.BaseRequest) -> bytes:
    """The request body, at most MAX_BODY_BYTES (a larger one: 413, never read whole)."""
    length = request.content_length
    if length is not None and length > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def peer_of(request: web.BaseRequest) -> str:
    """The peer address as gRPC writes it (`ipv4:10.0.0.7:51234`, `ipv6:[::1]:51234`): the
    failed-authentication throttle counts an address the same whichever door it uses."""
    transport = request.transport
    peername = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peername, tuple) or len(peername) < 2:
        return ""
    host, port = peername[0], peername[1]
    if ":" in str(host):
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


def _client_certificate(request: web.BaseRequest) -> bytes | None:
    """The client certificate the TLS handshake verified (PEM), if any."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


class HttpTls:
    """The listener's TLS context, following `ServerCertificates`: at each handshake, the
    context of the material in force (rebuilt once after each reload) is the one used."""

    def __init__(self, certificates: ServerCertificates) -> None:
        self._certificates = certificates
        self._material = certificates.material
        self.context = _tls_context(self._material)
        self._current = self.context
        self.context.sni_callback = self._handshake

    def _handshake(self, ssl_object: Any, server_name: str | None, context: Any) -> None:
        material = self._certificates.material
        if material is not self._material:
            self._material = material
            try:
                current = _tls_context(material)
            except (ssl.SSLError, OSError) as exc:  # checked when loaded: never expected
                logger.error("the reloaded TLS certificate cannot be used: %s", type(exc).__name__)
            else:
                current.sni_callback = self._handshake
                self._current = current
        if self._current is not self.context:
            ssl_object.context = self._current


def _tls_context(material: ServerTLSMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    # load_cert_chain reads files: the checked bytes go through a private directory.
    with tempfile.TemporaryDirectory(prefix="token-broker-tls-") as directory:
        cert, key = Path(directory) / "tls.crt", Path(directory) / "tls.key"
        for path, data in ((cert, material.cert_chain), (key, material.private_key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
        context.load_cert_chain(cert, key)
    if material.client_ca is not None:
        context.load_verify_locations(cadata=material.client_ca.decode("ascii"))
        context.verify_mode = (
            ssl.CERT_REQUIRED if material.require_client_auth else ssl.CERT_OPTIONAL
        )
    return context


class HttpDoor:
    """The HTTP door's listener. `start()`, then `stop(grace)`."""

    def __init__(
        self,
        listen: str,
        path: RequestPath,
        *,
        certificates: ServerCertificates | None,
        reuse_port: bool = False,
    ) -> None:
        self.listen = listen
        self._path = path
        self._metrics: BrokerMetrics = path.metrics
        self._tls = HttpTls(certificates) if certificates is not None else None
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self._address: str | None = None
        self._series: dict[tuple[str, str], Any] = {}

    @property
    def address(self) -> str:
        if self._address is None:
            raise RuntimeError("the HTTP door is not started")
        return self._address

    @property
    def url(self) -> str:
        return f"{'https' if self._tls is not None else 'http'}://{self.address}"

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def start(self) -> None:
        self._runner, self._address = await serve_app(
            self.build_app(),
            self.listen,
            "server.httpListen",
            reuse_port=self._reuse_port,
            backlog=1024,
            ssl_context=self._tls.context if self._tls is not None else None,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
            max_headers=MAX_HEADERS,
            # After an answer that did not read the whole body (413, 408, 404), what is left
            # is read and dropped for this long so that the client sees the answer (not a
            # reset); bounded, as a stop waits for it.
            lingering_time=LINGERING_SECONDS,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; requests in flight finish within `grace` seconds (None: now)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner._shutdown_timeout = 0.0 if grace is None else grace
        await runner.cleanup()

    # --- routing and observing ---------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        request_id = request_id_from(
            [(REQUEST_ID_METADATA_KEY, v) for v in request.headers.getall(_REQUEST_ID_HEADER, [])]
        )
        method = request.method if request.method in _METHODS else "other"
        raw_path = request.rel_url.raw_path
        handler_name = HANDLER_OTHER
        call: TokenCall | None = None
        with bind_request_id(request_id):
            try:
                match = _TOKEN_PATH.fullmatch(raw_path)
                if match is not None:
                    handler_name = HANDLER_KUBERNETES
                    if request.method != "POST":
                        response = _status(request, kstatus.method_not_allowed(), allow=True)
                    else:
                        namespace, name = (urllib.parse.unquote(g) for g in match.groups())
                        response, call = await self._kubernetes(
                            request, request_id, started, namespace, name
                        )
                elif raw_path == oauth.ROUTE:
                    handler_name = HANDLER_OAUTH
                    if request.method != "POST":
                        response = _oauth_response(405, oauth.method_not_allowed())
                        response.headers["Allow"] = "POST"
                    else:
                        response, call = await self._oauth(request, request_id, started)
                else:
                    response = _status(request, kstatus.path_not_found())
            except Exception as exc:
                logger.error(
                    "HTTP request failed unexpectedly: %s\n%s",
                    type(exc).__name__,
                    "".join(traceback.format_tb(exc.__traceback__)),
                    extra={"request_id": request_id},
                )
                response = _status(
                    request, kstatus.internal_error("internal error in the token broker")
                )
            response.headers[_REQUEST_ID_HEADER] = request_id
            if handler_name == HANDLER_KUBERNETES:
                # kube-apiserver's name for the id its audit events carry.
                response.headers["Audit-Id"] = request_id
            if response.status in (408, 413):
                # The rest of the body is not waited for: no keep-alive after this answer.
                response.force_close()
            elapsed = time.monotonic() - started
            self._observe(handler_name, method, response.status, elapsed)
            level = logging.DEBUG if call is not None and call.quiet else logging.INFO
            if access_logger.isEnabledFor(level):
                fields = call.access_fields() if call is not None else {}
                access_logger.log(
                    level,
                    "%s %s %d %.1fms",
                    method,
                    handler_name,
                    response.status,
                    elapsed * 1000,
                    extra={
                        "http_method": method,
                        "http_route": handler_name,
                        "http_status": response.status,
                        "latency_ms": round(elapsed * 1000, 3),
                        "request_id": request_id,
                        **fields,
                    },
                )
        return response

    def _observe(self, handler: str, method: str, code: int, elapsed: float) -> None:
        metrics = self._metrics
        metrics.http_requests.labels(handler, method, str(code)).inc()
        key = (handler, method)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metrics.http_request_seconds.labels(handler, method)
        series.observe(elapsed)

    # --- the doors ------------------------------------------------------------------------------

    async def _kubernetes(
        self, request: web.Request, request_id: str, started: float, namespace: str, name: str
    ) -> tuple[web.Response, TokenCall]:
        credentials = Credentials(
            authorization=tuple(request.headers.getall("Authorization", [])),
            peer=peer_of(request),
            load_client_certificate=lambda: _client_certificate(request),
        )
        call = TokenCall(
            request_id,
            credentials,
            time_remaining=_no_deadline,
            started=started,
            door=DOOR_HTTP_KUBERNETES,
        )
        answer_type = kube.answer_media_type(request.headers.get("Accept", ""))
        lenient: list[str] = []

        async def receive() -> bytes | None:
            body = await read_body(request)
            try:
                raw, warnings = kube.request_message(
                    namespace, name, request.query, request.headers.get("Content-Type", ""), body
                )
            except kube.StatusRefusal as refusal:
                call.refusal = refusal
                call.request = pb.CreateTokenRequest(namespace=namespace, service_account=name)
                return b""
            lenient.extend(warnings)
            if answer_type is None:
                status_error = kube.not_acceptable()
                call.refusal = kube.StatusRefusal.of(
                    Reason.REQUEST_MALFORMED, status_error.message, status=status_error
                )
            return raw

        try:
            answer = await self._path.create_token(call, receive)
        except BrokerError as err:
            response = _status(request, kube.status_for(err, namespace, name))
            _refusal_headers(response, err)
            return response, call
        message = pb.CreateTokenResponse.FromString(answer)
        if answer_type == kube.PROTOBUF:
            response = web.Response(
                status=201,
                body=kube.token_request_protobuf(message.token_request),
                content_type=kube.PROTOBUF,
            )
        else:
            response = web.Response(
                status=201,
                body=kstatus.go_json(
                    kube.token_request_json(message.token_request),
                    pretty=kube.is_pretty(request.query, request.headers.get("User-Agent", "")),
                ),
                content_type=kube.JSON,
            )
        response.headers["Cache-Control"] = "no-cache, private"
        for value in kube.warning_headers([*lenient, *message.warnings]):
            response.headers.add("Warning", value)
        return response, call

    async def _oauth(
        self, request: web.Request, request_id: str, started: float
    ) -> tuple[web.Response, TokenCall]:
        # The subject token is the only credential here (an Authorization header, e.g. a
        # library's client_secret_basic, and a client certificate are not looked at).
        credentials = Credentials(peer=peer_of(request), jwt_only=True)
        call = TokenCall(
            request_id,
            credentials,
            time_remaining=_no_deadline,
            started=started,
            door=DOOR_HTTP_OAUTH,
        )

        async def receive() -> bytes | None:
            body = await read_body(request)
            form = oauth.parse_form(request.headers.get("Content-Type", ""), body)
            if form.subject_token is not None:
                credentials.authorization = (f"Bearer {form.subject_token}",)
            if form.refusal is not None:
                call.refusal = form.refusal
            return form.request

        try:
            answer = await self._path.create_token(call, receive)
        except BrokerError as err:
            status, body = oauth.error_answer(err)
            response = _oauth_response(status, body)
            _refusal_headers(response, err)
            return response, call
        message = pb.CreateTokenResponse.FromString(answer)
        return _oauth_response(200, oauth.token_answer(message)), call


def _refusal_headers(response: web.Response, error: BrokerError) -> None:
    response.headers[REASON_HEADER] = error.reason
    retry = retry_after_header(error)
    if retry is not None and response.status in (429, 503, 504):
        response.headers["Retry-After"] = retry


def _status(
    request: web.BaseRequest, error: kstatus.StatusError, *, allow: bool = False
) -> web.Response:
    """A Status answer, in the content type the client's Accept prefers (protobuf or JSON;
    JSON when it accepts neither, the 406 included), as kube-apiserver negotiates errors."""
    if kube.answer_media_type(request.headers.get("Accept", "")) == kube.PROTOBUF:
        response = web.Response(
            status=error.code, body=error.protobuf(), content_type=kube.PROTOBUF
        )
    else:
        response = web.Response(
            status=error.code,
            body=kstatus.go_json(
                error.body(),
                pretty=kube.is_pretty(request.query, request.headers.get("User-Agent", "")),
            ),
            content_type=kube.JSON,
        )
    response.headers["Cache-Control"] = "no-cache, private"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if allow:
        response.headers["Allow"] = "POST"
    return response


def _oauth_response(status: int, body: bytes) -> web.Response:
    response = web.Response(status=status, body=body, content_type="application/json")
    response.headers.update(oauth.NO_STORE)
    return response
