"""The emulator's HTTP surface (aiohttp): authentication, routing and the token endpoint.

Order for the token endpoint, as the apiserver's filter chain and create handler run:
authentication (401) -> faults (APF 429, 5xx, drops, latency) -> authorization (403) ->
content type (415) -> body size (413) -> create options (422) -> decoding (400) -> the
create.go checks and the token handler (tokenrequest.py).

Nothing here logs a credential or a token: log lines carry method, path, user and status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from broker.apiserver import status
from broker.apiserver.body import (
    KIND,
    DecodedTokenRequest,
    DecodeFailure,
    cannot_handle,
    decode_json,
    decode_protobuf,
    parse_json_for_record,
    yaml_to_json,
)
from broker.apiserver.wire import PROTOBUF_MEDIA_TYPE
from broker.emulator.auth import (
    TOKEN_RESOURCE,
    AccessControl,
    ObjectGone,
    ServiceAccountTokenAuthenticator,
    UserInfo,
)
from broker.emulator.config import EmulatorConfig
from broker.emulator.faults import FaultAction, Faults
from broker.emulator.records import RecordedRequest, RequestLog, frozen_query
from broker.emulator.resources import ResourceApi
from broker.emulator.store import ObjectNotFound, ObjectStore
from broker.emulator.tokenrequest import create_token
from broker.emulator.tokens import TokenSigner

logger = logging.getLogger("broker.emulator")

MAX_BODY_BYTES = 3 * 1024 * 1024  # the apiserver's default MaxRequestBodyBytes
JSON = "application/json"
YAML = "application/yaml"
ACCEPTED_MEDIA_TYPES = (JSON, YAML, PROTOBUF_MEDIA_TYPE)
FIELD_MANAGER_MAX_LENGTH = 128
FIELD_VALIDATION_VALUES = ("", "Ignore", "Strict", "Warn")
APF_MESSAGE = "Too many requests, please try again later."

TOKEN_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token$")
# Served to callers without credentials (public-info-viewer, issuer discovery).
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/livez",
        "/readyz",
        "/version",
        "/openid/v1/jwks",
        "/.well-known/openid-configuration",
    }
)


def _is_pretty(request: web.BaseRequest) -> bool:
    """apiserver isPrettyPrint: ?pretty=<bool>, else curl/wget/browser user agents."""
    value = request.query.get("pretty", "")
    if value:
        return value in ("1", "t", "T", "TRUE", "true", "True")
    agent = request.headers.get("User-Agent", "")
    return agent.startswith(("curl", "Wget", "Mozilla/5.0"))


def _media_type(header: str) -> str:
    return header.split(";", 1)[0].strip().lower() if header else JSON


def json_response(
    request: web.BaseRequest,
    code: int,
    obj: Any,
    *,
    warnings: Sequence[str] = (),
    headers: dict[str, str] | None = None,
) -> web.Response:
    response = web.Response(
        status=code,
        body=status.go_json(obj, pretty=_is_pretty(request)),
        content_type=JSON,
    )
    response.headers["Audit-Id"] = str(uuid.uuid4())
    response.headers["Cache-Control"] = "no-cache, private"
    for text in dict.fromkeys(warnings):  # the apiserver de-duplicates warnings
        response.headers.add("Warning", status.warning_header(text))
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _seconds_header(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def status_response(request: web.BaseRequest, err: status.StatusError) -> web.Response:
    headers = dict(err.headers)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    retry = (err.details or {}).get("retryAfterSeconds")
    if retry:
        headers.setdefault("Retry-After", str(retry))
    return json_response(request, err.code, err.body(), headers=headers)


def _plain(code: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    """Go's http.Error: text/plain, nosniff, the text and a newline."""
    response = web.Response(status=code, text=text + "\n", charset="utf-8")
    response.headers["X-Content-Type-Options"] = "nosniff"
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _record_body(media: str, data: bytes) -> Any:
    try:
        if media == PROTOBUF_MEDIA_TYPE:
            return decode_protobuf(data)[1]
        if media == YAML:
            return parse_json_for_record(yaml_to_json(data))
    except DecodeFailure:
        return None
    return parse_json_for_record(data)


def _create_options_errors(query: Any) -> list[status.FieldError]:
    """ValidateCreateOptions: fieldManager, dryRun, fieldValidation."""
    errors: list[status.FieldError] = []
    manager: str = query.get("fieldManager", "")
    if len(manager.encode("utf-8")) > FIELD_MANAGER_MAX_LENGTH:
        errors.append(status.too_long("fieldManager", FIELD_MANAGER_MAX_LENGTH))
    position = 0
    for char in manager:
        if not char.isprintable():
            errors.append(
                status.invalid(
                    "fieldManager",
                    manager,
                    f"invalid character U+{ord(char):04X} (at position {position})",
                )
            )
        position += len(char.encode("utf-8", errors="surrogatepass"))
    dry_run: list[str] = query.getall("dryRun", [])
    if any(value != "All" for value in dry_run):
        errors.append(status.not_supported("dryRun", dry_run, ["All"]))
    validation: str = query.get("fieldValidation", "")
    if validation not in FIELD_VALIDATION_VALUES:
        errors.append(status.not_supported("fieldValidation", validation, FIELD_VALIDATION_VALUES))
    return errors


class ApiServer:
    """Request handling; the Emulator owns the state it reads."""

    def __init__(
        self,
        *,
        config: EmulatorConfig,
        store: ObjectStore,
        access: AccessControl,
        faults: Faults,
        log: RequestLog,
        signer: TokenSigner,
        base_url: Callable[[], str],
        closing: asyncio.Event,
    ) -> None:
        self.config = config
        self.store = store
        self.access = access
        self.faults = faults
        self.log = log
        self.signer = signer
        self._base_url = base_url
        self._closing = closing
        self._resources = ResourceApi(store, access)
        self._service_account_tokens = ServiceAccountTokenAuthenticator(
            public_key=signer.public_key(),
            algorithm=signer.algorithm,
            issuer=config.issuer,
            audiences=config.audiences,
            lookup=self._token_objects_exist,
        )

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            response = await self._dispatch(request)
        except status.StatusError as err:
            response = status_response(request, err)
        logger.debug("%s %s -> %s", request.method, request.path, response.status)
        return response

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        header = request.headers.get("Authorization")
        user = self.access.authenticate(header)
        if user is None and header is not None:
            # The API server accepts the service-account tokens it issued itself.
            user = self._service_account_tokens.authenticate(header)
        if user is None:
            # Only requests without credentials are anonymous; bad credentials are a 401.
            if header is None and method in ("GET", "HEAD") and path in PUBLIC_PATHS:
                return self._public(request, path)
            raise status.unauthorized()
        if path in PUBLIC_PATHS:
            if method not in ("GET", "HEAD"):
                raise status.method_not_allowed()
            return self._public(request, path)
        match = TOKEN_PATH.match(path)
        if match:
            if method != "POST":
                raise status.method_not_allowed()
            return await self._token(request, user, match.group(1), match.group(2))
        if path.startswith("/emulator/"):
            return await self._admin(request, user, path)
        discovery = self._discovery(path)
        if discovery is not None:
            if method not in ("GET", "HEAD"):
                raise status.method_not_allowed()
            return json_response(request, 200, discovery)
        handler = self._resources.route(method, path)
        if handler is None:
            raise status.path_not_found()
        code, obj = await handler(request, user)
        return json_response(request, code, obj)

    def _token_objects_exist(self, claims: dict[str, Any]) -> None:
        """The service account and the pod/secret a token names still exist, same UIDs."""
        private = claims["kubernetes.io"]
        namespace = str(private["namespace"])
        getters: dict[str, Callable[[str, str], Any]] = {
            "serviceaccount": self.store.get_service_account,
            "pod": self.store.get_pod,
            "secret": self.store.get_secret,
        }
        for claim, get in getters.items():
            ref = private.get(claim)
            if ref is None:
                continue
            if not isinstance(ref, dict):
                raise ObjectGone()
            try:
                obj = get(namespace, str(ref.get("name")))
            except ObjectNotFound:
                raise ObjectGone() from None
            if ref.get("uid") != obj.uid:
                raise ObjectGone()

    # --- unauthenticated endpoints --------------------------------------------------------

    def _public(self, request: web.Request, path: str) -> web.StreamResponse:
        if path in ("/healthz", "/livez", "/readyz"):
            return web.Response(status=200, text="ok", content_type="text/plain")
        if path == "/version":
            return json_response(request, 200, self._version())
        cache = {"Cache-Control": "public, max-age=3600"}
        if path == "/openid/v1/jwks":
            response = web.Response(status=200, body=status.go_json(self.signer.jwks()))
            response.headers["Content-Type"] = "application/jwk-set+json"
            response.headers.update(cache)
            return response
        jwks_uri = self.config.jwks_uri or f"{self._base_url()}/openid/v1/jwks"
        discovery = {
            "issuer": self.config.issuer,
            "jwks_uri": jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.signer.algorithm],
        }
        response = web.Response(status=200, body=status.go_json(discovery), content_type=JSON)
        response.headers.update(cache)
        return response

    def _version(self) -> dict[str, str]:
        version = self.config.git_version.lstrip("v").split(".")
        return {
            "major": version[0],
            "minor": version[1] if len(version) > 1 else "0",
            "gitVersion": self.config.git_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-04-17T17:27:03Z",
            "goVersion": "go1.22.2",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _discovery(self, path: str) -> dict[str, Any] | None:
        if path == "/api":
            address = self._base_url().removeprefix("https://")
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                ],
            }
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        if path == "/api/v1":
            return self._resources.discovery()
        return None

    # --- the token endpoint ---------------------------------------------------------------

    async def _token(
        self, request: web.Request, user: UserInfo, namespace: str, name: str
    ) -> web.StreamResponse:
        too_large: status.StatusError | None = None
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            data, too_large = b"", status.request_entity_too_large(MAX_BODY_BYTES)
        content_type = request.headers.get("Content-Type", "")
        media = _media_type(content_type)
        record = RecordedRequest(
            namespace=namespace,
            name=name,
            user=user.name,
            groups=user.groups,
            content_type=content_type,
            body=_record_body(media, data),
            query=frozen_query(request.query),
        )
        self.log.enter(record)
        try:
            try:
                response = await self._token_flow(
                    request, record, user, namespace, name, data, media, too_large
                )
            except status.StatusError as err:
                response = status_response(request, err)
            if response is None:  # dropped
                logger.info("token request %s/%s: connection dropped (fault)", namespace, name)
                return web.Response(status=204)  # never sent: the transport is gone
            record.status = response.status
            return response
        finally:
            self.log.leave()

    async def _token_flow(
        self,
        request: web.Request,
        record: RecordedRequest,
        user: UserInfo,
        namespace: str,
        name: str,
        data: bytes,
        media: str,
        too_large: status.StatusError | None,
    ) -> web.Response | None:
        await self._sleep()
        action = self.faults.next_action()
        if action is not None:
            if action.kind == "drop":
                record.fault, record.dropped = "drop", True
                if request.transport is not None:
                    request.transport.abort()
                return None
            record.fault = f"fail {action.status}"
            return self._fault_response(request, action)

        if not self.access.authorize(user, "create", TOKEN_RESOURCE, namespace, name):
            raise status.forbidden(
                "serviceaccounts",
                name,
                status.forbidden_message(
                    user.name,
                    "create",
                    resource="serviceaccounts",
                    subresource="token",
                    namespace=namespace,
                ),
            )
        if media not in ACCEPTED_MEDIA_TYPES:
            raise status.unsupported_media_type(ACCEPTED_MEDIA_TYPES)
        if too_large is not None:
            raise too_large
        errors = _create_options_errors(request.query)
        if errors:
            raise status.new_invalid("meta.k8s.io", "CreateOptions", "", errors)

        decoded = self._decode(media, data)
        warnings: list[str] = []
        directive = request.query.get("fieldValidation", "") or "Warn"
        if decoded.strict_errors and directive == "Strict":
            raise status.bad_request(
                str(
                    cannot_handle(
                        KIND,
                        decoded.version,
                        "strict decoding error: " + ", ".join(decoded.strict_errors),
                    )
                )
            )
        if directive == "Warn":
            warnings.extend(decoded.strict_errors)

        signing_failure = self.faults.take_signing_failure()

        def sign_hook() -> None:
            if signing_failure is not None:
                raise RuntimeError(signing_failure)

        result = create_token(
            namespace=namespace,
            name=name,
            request=decoded,
            config=self.config,
            store=self.store,
            signer=self.signer,
            sign_hook=sign_hook,
        )
        record.audit_annotations = result.audit_annotations
        warnings.extend(result.warnings)
        record.warnings = list(dict.fromkeys(warnings))
        return json_response(request, 201, result.body, warnings=warnings)

    @staticmethod
    def _decode(media: str, data: bytes) -> DecodedTokenRequest:
        try:
            if media == PROTOBUF_MEDIA_TYPE:
                return decode_protobuf(data)[0]
            if media == YAML:
                return decode_json(yaml_to_json(data))
            return decode_json(data)
        except DecodeFailure as err:
            raise status.bad_request(str(err)) from None

    def _fault_response(self, request: web.Request, action: FaultAction) -> web.Response:
        retry = action.retry_after
        if action.status == 429:
            headers = {"Retry-After": _seconds_header(retry if retry is not None else 1)}
            return _plain(429, action.message or APF_MESSAGE, headers)
        retry_seconds = int(retry) if retry is not None else 0
        if action.status == 500:
            err = status.internal_error(action.message or "emulated failure", retry_seconds)
        elif action.status == 503:
            err = status.service_unavailable(
                action.message or "the server is currently unable to handle the request",
                retry_seconds,
            )
        else:
            err = status.generic(action.status, action.message, retry_seconds)
        if retry is not None:
            err.headers["Retry-After"] = _seconds_header(retry)
        return status_response(request, err)

    async def _sleep(self) -> None:
        """Injected latency, measured against the current setting: lowering `latency`
        releases requests already waiting, and stopping the emulator ends every wait."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (remaining := self.faults.latency - (loop.time() - start)) > 0:
            try:
                await asyncio.wait_for(self._closing.wait(), timeout=min(remaining, 0.05))
                return
            except TimeoutError:
                continue

    # --- admin endpoints ------------------------------------------------------------------

    async def _admin(self, request: web.Request, user: UserInfo, path: str) -> web.Response:
        if not user.is_admin:
            raise status.forbidden(
                "", "", status.forbidden_message(user.name, request.method.lower(), path=path)
            )
        routes: dict[tuple[str, str], Callable[[web.Request], Awaitable[web.Response]]] = {
            ("GET", "/emulator/faults"): self._get_faults,
            ("POST", "/emulator/faults"): self._post_faults,
            ("GET", "/emulator/requests"): self._get_requests,
            ("POST", "/emulator/reset-counters"): self._reset_counters,
        }
        handler = routes.get((request.method, path))
        if handler is None:
            if any(p == path for _, p in routes):
                raise status.method_not_allowed()
            raise status.path_not_found()
        return await handler(request)

    async def _get_faults(self, request: web.Request) -> web.Response:
        return json_response(request, 200, self.faults.snapshot())

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            raise status.bad_request("the request body is not JSON") from None
        if not isinstance(data, dict):
            raise status.bad_request("the request body must be a JSON object")
        try:
            self.faults.configure(data)
        except ValueError as err:
            raise status.bad_request(str(err)) from None
        return json_response(request, 200, self.faults.snapshot())

    async def _get_requests(self, request: web.Request) -> web.Response:
        return json_response(
            request,
            200,
            {
                "count": len(self.log.requests),
                "inFlight": self.log.in_flight,
                "inFlightMax": self.log.in_flight_max,
                "requests": [r.to_json() for r in self.log.requests],
            },
        )

    async def _reset_counters(self, request: web.Request) -> web.Response:
        self.log.reset()
        return json_response(request, 200, {"count": 0})
