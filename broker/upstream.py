"""The Kubernetes API client: POST .../serviceaccounts/{name}/token via `kubernetes.aio`.

Retries are ours, not the library's: only retryable failures (connection errors, 429, 5xx),
with exponential backoff and full jitter, all inside the caller's deadline. Every failure
becomes a BrokerError; the API server's own message is relayed verbatim.

Secrets: the token (in the response) and the broker's bearer credential (in the client
configuration) never appear in a log line, an exception message or a repr.

Observers (`add_observer`: metrics, readiness) see every attempt's outcome (`AttemptOutcome`:
the HTTP status, or why there was none, and how long it took) and every retry. `probe()` asks
the API server's `/readyz`, for readiness when no calls come in.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
import grpc
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig

from broker.backoff import backoff_ceiling, backoff_delay
from broker.config import ConfigError, KubernetesSettings, RetrySettings
from broker.convert import (
    ConversionError,
    kubernetes_field_to_proto,
    token_request_body,
    token_request_from_json,
)
from broker.errors import KUBERNETES_DOMAIN, BrokerError, FieldViolation
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.reasons import (
    Reason,
    default_status_reason,
    kubernetes_code,
    kubernetes_reason,
    kubernetes_retryable,
)
from broker.validation import MESSAGE_BUDGET, fit_violations, truncate_utf8

logger = logging.getLogger(__name__)

# ErrorInfo metadata of an API-server refusal: the Status details' kind (e.g. serviceaccounts).
METADATA_KUBERNETES_KIND = "kubernetesKind"

# Do not start (or sleep before) an attempt with less time than this left: it cannot finish.
MIN_ATTEMPT_SECONDS = 0.05
# Metadata values are bounded: Status details echo caller input.
_METADATA_VALUE_LIMIT = 256
# The TokenRequest subresource, and the answers it is asked for (the generated client's).
TOKEN_PATH = "/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
_ACCEPT = "application/json"


@dataclass(frozen=True, repr=False)
class UpstreamResult:
    """The API server's TokenRequest (status filled in) and its warnings."""

    token_request: pb.TokenRequest
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        # Never the token: only what identifies the request.
        tr = self.token_request
        return (
            f"UpstreamResult(namespace={tr.metadata.namespace!r}, name={tr.metadata.name!r}, "
            f"expiration_seconds={tr.spec.expiration_seconds}, "
            f"expiration_timestamp={tr.status.expiration_timestamp.ToJsonString()!r}, "
            f"token=<redacted>, warnings={self.warnings!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class AttemptOutcome:
    """One HTTP request to the API server: its status, or why there is none.

    `error`: "connection" (refused, reset, TLS...), "timeout" (the attempt's own timeout), or
    "deadline" (the caller's deadline or a cancellation cut it short: says nothing about
    the API server).
    """

    status: int | None
    error: Literal["connection", "timeout", "deadline"] | None
    seconds: float

    @property
    def code(self) -> str:
        """The metrics label: the HTTP status, "timeout", or "error" (no answer)."""
        if self.status is not None:
            return str(self.status)
        return "error" if self.error == "connection" else "timeout"

    @property
    def reachable(self) -> bool | None:
        """Whether the API server is reachable, as far as this outcome tells: it answered
        with a non-5xx status. None when the attempt was cut short by the caller."""
        if self.status is not None:
            return self.status < 500
        return None if self.error == "deadline" else False


class UpstreamObserver(Protocol):
    """Told about every attempt and retry (called on the event loop; must not block)."""

    def upstream_attempt(self, outcome: AttemptOutcome) -> None: ...

    def upstream_retry(self) -> None: ...


@dataclass
class _Failure:
    """One failed attempt: whether to retry and what to answer if it is the last."""

    error: BrokerError
    retryable: bool
    retry_after: float | None = None  # the server's Retry-After, if any
    detail: str = ""  # for logs only
    log_fields: dict[str, str] = field(default_factory=dict)


class UpstreamClient:
    """Creates tokens on the Kubernetes API server with the broker's own credentials."""

    def __init__(self, api_client: Any, settings: KubernetesSettings) -> None:
        self._api_client = api_client
        self._settings = settings
        self._retry: RetrySettings = settings.retry
        self._observers: list[UpstreamObserver] = []

    def __repr__(self) -> str:
        return f"UpstreamClient(host={self._api_client.configuration.host!r})"

    @classmethod
    async def from_settings(cls, settings: KubernetesSettings) -> UpstreamClient:
        """In-cluster config or a kubeconfig (+ context); `auto` picks in-cluster in a pod."""
        cfg = kclient.Configuration()
        mode = settings.mode
        if mode == "auto":
            mode = "inCluster" if os.environ.get("KUBERNETES_SERVICE_HOST") else "kubeconfig"
        try:
            if mode == "inCluster":
                # Synchronous file reads: off the event loop.
                await asyncio.to_thread(kconfig.load_incluster_config, client_configuration=cfg)
                _refresh_hook_off_loop(cfg)
            else:
                await asyncio.to_thread(_check_kubeconfig_exists, settings.kubeconfig)
                await kconfig.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=str(settings.kubeconfig) if settings.kubeconfig else None,
                    context=settings.context,
                    client_configuration=cfg,
                    # The broker never writes the kubeconfig back (read-only root filesystem).
                    persist_config=False,
                )
        except ConfigError:
            raise
        except Exception as exc:
            # ConfigException texts name files and keys, never credentials.
            source = "in-cluster config" if mode == "inCluster" else "kubeconfig"
            raise ConfigError(f"cannot load the Kubernetes {source}: {exc}") from None
        # Our retries only: the library's would ignore the caller's deadline.
        cfg.retries = None
        _environment_read_once(cfg)
        cfg.connection_pool_maxsize = settings.connection_pool_size
        # ApiClient builds its SSL context (reads the CA file) in the constructor.
        api_client = await asyncio.to_thread(kclient.ApiClient, cfg)
        return cls(api_client, settings)

    async def close(self) -> None:
        await self._api_client.close()

    def add_observer(self, observer: UpstreamObserver) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer: UpstreamObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def _notify(self, outcome: AttemptOutcome) -> None:
        for observer in self._observers:
            try:
                observer.upstream_attempt(outcome)
            except Exception:
                logger.exception("upstream observer %r failed", observer)

    async def probe(self, timeout: float) -> AttemptOutcome:  # noqa: ASYNC109
        """GET /readyz with the broker's credentials (public on every API server): is the
        API server reachable? Not reported to the observers."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        error: Literal["connection", "timeout", "deadline"] | None = None
        try:
            async with asyncio.timeout(timeout):
                method, url, headers, _, _ = await self._api_client.param_serialize(
                    "GET",
                    "/readyz",
                    header_params={"Accept": "text/plain"},
                    auth_settings=["BearerToken"],
                )
                response = await self._api_client.call_api(
                    method,
                    url,
                    header_params=headers,
                    _preload_content=False,
                    _request_timeout=float(max(timeout, 0.001)),
                )
                try:
                    await response.read()
                    status = int(response.status)
                finally:
                    response.response.release()
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = "connection"
            logger.debug("readiness probe of the Kubernetes API failed: %s", type(exc).__name__)
        return AttemptOutcome(status=status, error=error, seconds=loop.time() - started)

    async def create_token(
        self,
        namespace: str,
        name: str,
        token_request: pb.TokenRequest,
        *,
        dry_run: bool = False,
        field_manager: str = "",
        field_validation: str = "",
        # The caller's remaining deadline, applied below with asyncio.timeout_at.
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> UpstreamResult:
        """Create a token, retrying retryable failures within `timeout` seconds.

        `timeout` is the caller's remaining gRPC deadline; None means no deadline (the
        configured request timeout applies). Raises BrokerError on every failure.
        """
        budget = self._settings.request_timeout_seconds if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, budget)
        body = token_request_body(token_request)
        query: list[tuple[str, str]] = []
        if dry_run:
            query.append(("dryRun", "All"))
        if field_manager:
            query.append(("fieldManager", field_manager))
        if field_validation:
            query.append(("fieldValidation", field_validation))
        try:
            async with asyncio.timeout_at(deadline):
                return await self._attempts(namespace, name, body, query, deadline)
        except TimeoutError:
            logger.warning(
                "upstream deadline exhausted after %.3fs for %s/%s", budget, namespace, name
            )
            raise _timeout_error(budget) from None

    async def _attempts(
        self,
        namespace: str,
        name: str,
        body: dict[str, Any],
        query: list[tuple[str, str]],
        deadline: float,
    ) -> UpstreamResult:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            started = loop.time()
            remaining = deadline - started
            per_attempt = min(remaining, self._settings.request_timeout_seconds)
            outcome = await self._attempt(namespace, name, body, query, per_attempt)
            if isinstance(outcome, UpstreamResult):
                if attempt > 1:
                    logger.info(
                        "upstream succeeded on attempt %d for %s/%s", attempt, namespace, name
                    )
                return outcome
            failure = outcome
            took = loop.time() - started
            if not failure.retryable or attempt >= self._retry.max_attempts:
                self._log_final(failure, attempt, namespace, name)
                raise self._final_error(failure, attempt)
            delay = self._delay(attempt, failure)
            if delay is None:
                # A Retry-After longer than we wait for: the caller may retry later.
                self._log_final(failure, attempt, namespace, name)
                raise self._final_error(failure, attempt)
            # Never sleep past the deadline, nor start an attempt that cannot finish:
            # it needs at least about as long as the last one took.
            left_after_sleep = deadline - loop.time() - delay
            if left_after_sleep < max(MIN_ATTEMPT_SECONDS, took):
                logger.warning(
                    "upstream attempt %d for %s/%s failed (%s); not retrying: waiting %.3fs "
                    "would leave %.3fs of the deadline, too little for another attempt",
                    attempt,
                    namespace,
                    name,
                    failure.detail,
                    delay,
                    left_after_sleep,
                )
                raise self._final_error(failure, attempt)
            logger.info(
                "upstream attempt %d for %s/%s failed (%s); retrying in %.3fs",
                attempt,
                namespace,
                name,
                failure.detail,
                delay,
            )
            for observer in self._observers:
                observer.upstream_retry()
            await asyncio.sleep(delay)

    def _delay(self, attempt: int, failure: _Failure) -> float | None:
        """Seconds to wait before the next attempt; None when Retry-After is too long."""
        if failure.retry_after is not None:
            if failure.retry_after > self._retry.max_retry_after_seconds:
                return None
            return failure.retry_after
        return backoff_delay(
            attempt,
            initial=self._retry.initial_backoff_seconds,
            maximum=self._retry.max_backoff_seconds,
        )

    def _final_error(self, failure: _Failure, attempt: int) -> BrokerError:
        """The error to answer; a retryable one always says when to retry (RetryInfo)."""
        error = failure.error
        retryable = failure.retryable and error.code == grpc.StatusCode.UNAVAILABLE
        if retryable and error.retry_after is None:
            error.retry_after = failure.retry_after or self._backoff_ceiling(attempt)
        return error

    def _backoff_ceiling(self, attempt: int) -> float:
        return backoff_ceiling(
            attempt,
            initial=self._retry.initial_backoff_seconds,
            maximum=self._retry.max_backoff_seconds,
        )

    def _log_final(self, failure: _Failure, attempt: int, namespace: str, name: str) -> None:
        level = logging.WARNING if failure.retryable else logging.INFO
        logger.log(
            level,
            "upstream call for %s/%s failed after %d attempt(s): %s",
            namespace,
            name,
            attempt,
            failure.detail,
        )

    async def _attempt(
        self,
        namespace: str,
        name: str,
        body: dict[str, Any],
        query: list[tuple[str, str]],
        attempt_timeout: float,
    ) -> UpstreamResult | _Failure:
        """One attempt, its outcome reported to the observers."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        # What the observers are told if the attempt is cut short (the caller's deadline).
        answered: list[int] = []
        error: Literal["connection", "timeout", "deadline"] | None = "deadline"
        try:
            outcome = await self._attempt_once(
                namespace, name, body, query, attempt_timeout, answered
            )
            if answered:
                error = None
            elif isinstance(outcome, _Failure):
                error = (
                    "timeout" if outcome.error.reason == Reason.UPSTREAM_TIMEOUT else "connection"
                )
            return outcome
        finally:
            self._notify(
                AttemptOutcome(
                    status=answered[0] if answered else None,
                    error=error,
                    seconds=loop.time() - started,
                )
            )

    async def _attempt_once(
        self,
        namespace: str,
        name: str,
        body: dict[str, Any],
        query: list[tuple[str, str]],
        attempt_timeout: float,
        answered: list[int],
    ) -> UpstreamResult | _Failure:
        try:
            # The request the generated `create_namespaced_service_account_token` makes,
            # through the same ApiClient (configuration, credentials, TLS, connection pool),
            # with a JSON body of plain values: the generated method would validate its
            # arguments and build the body's models with pydantic on every call. The raw
            # aiohttp response (not preloaded): a model would hold the token, and folding the
            # headers into a dict would lose all but one Warning header.
            serialized = await self._api_client.param_serialize(
                method="POST",
                resource_path=TOKEN_PATH,
                path_params={"name": name, "namespace": namespace},
                query_params=list(query),
                header_params={"Accept": _ACCEPT},
                body=body,
                post_params=[],
                files={},
                auth_settings=["BearerToken"],
                collection_formats={},
            )
            answer = await self._api_client.call_api(
                *serialized,
                _preload_content=False,
                _request_timeout=float(max(attempt_timeout, 0.001)),
            )
            response = answer.response
            try:
                raw = await response.read()
                status = int(response.status)
                headers = response.headers
            finally:
                response.release()
            answered.append(status)
        except TimeoutError as exc:
            # aiohttp's per-attempt timeout (the overall deadline surfaces as a cancellation
            # and is turned into DEADLINE_EXCEEDED by create_token). Retryable if time is left.
            return _Failure(
                error=_timeout_error(attempt_timeout),
                retryable=True,
                detail=f"{type(exc).__name__} after {attempt_timeout:.3f}s",
            )
        except aiohttp.ClientSSLError as exc:
            # A TLS/CA problem is configuration, not a transient failure.
            return _transport_failure(exc, retryable=False)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            return _transport_failure(exc, retryable=True)
        return _outcome(status, headers, raw)


def _timeout_error(seconds: float) -> BrokerError:
    return BrokerError.of(
        Reason.UPSTREAM_TIMEOUT,
        "the deadline expired before the Kubernetes API server answered",
        metadata={"timeoutSeconds": f"{seconds:.3f}"},
    )


def _environment_read_once(cfg: Any) -> None:
    """The client's aiohttp session trusts the environment (`trust_env`), which reads
    ~/.netrc (`$NETRC`) in a thread for every request: a thread hop and a file parse per API
    call, and a netrc entry matching the API server (or a `default` one) makes aiohttp refuse
    every request, which already carries an Authorization header. The environment's proxy, the
    other thing `trust_env` gives, is resolved once here instead (`HTTPS_PROXY`/`NO_PROXY`,
    unless the kubeconfig names a `proxy-url`)."""
    if not cfg.proxy:
        cfg.proxy = environment_proxy(cfg.host)
    cfg.client_session_kwargs = {**(cfg.client_session_kwargs or {}), "trust_env": False}


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for `url`, as aiohttp's `trust_env` would pick it."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if not host or urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _refresh_hook_off_loop(cfg: Any) -> None:
    """The in-cluster loader re-reads the token file every minute: do that in a thread."""
    hook = cfg.refresh_api_key_hook
    if hook is None:
        return

    async def refresh(c: Any) -> None:
        await asyncio.to_thread(hook, c)

    cfg.refresh_api_key_hook = refresh


def _transport_failure(exc: BaseException, *, retryable: bool) -> _Failure:
    # The cause is logged, not sent: it names the API server's internal address.
    return _Failure(
        error=BrokerError.of(
            Reason.KUBERNETES_UNREACHABLE, "the Kubernetes API server is unreachable"
        ),
        retryable=retryable,
        detail=f"{type(exc).__name__}: {_safe_text(str(exc))}",
    )


def _safe_text(text: str) -> str:
    # Transport errors carry no credentials, but bound them anyway.
    return truncate_utf8(text, 300)


def _outcome(status: int, headers: Mapping[str, str], raw: bytes) -> UpstreamResult | _Failure:
    if 200 <= status <= 299:
        try:
            token_request = token_request_from_json(raw)
        except ConversionError as exc:
            return _Failure(
                error=BrokerError.of(
                    Reason.KUBERNETES_INVALID_RESPONSE,
                    f"the Kubernetes API server's answer could not be read: {exc}",
                    metadata={"kubernetesCode": str(status)},
                ),
                retryable=False,
                detail=f"HTTP {status}: {exc}",
            )
        return UpstreamResult(token_request=token_request, warnings=parse_warnings(headers))
    return _status_failure(status, headers, raw)


def _status_failure(status: int, headers: Mapping[str, str], raw: bytes) -> _Failure:
    parsed = _parse_status(raw)
    reason = str(parsed.get("reason") or "") or default_status_reason(status)
    message = str(parsed.get("message") or "")
    if not message:
        # e.g. API Priority and Fairness' plain-text 429 body.
        text = raw.decode("utf-8", errors="replace").strip()
        message = text or f"the Kubernetes API server answered HTTP {status}"
    raw_details = parsed.get("details")
    details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
    metadata = {"kubernetesReason": reason or "Unknown", "kubernetesCode": str(status)}
    for key, meta_key in (("kind", METADATA_KUBERNETES_KIND), ("name", "kubernetesName")):
        value = details.get(key)
        if isinstance(value, str) and value:
            metadata[meta_key] = truncate_utf8(value, _METADATA_VALUE_LIMIT)
    if isinstance(details.get("group"), str) and details["group"]:
        metadata["kubernetesGroup"] = truncate_utf8(details["group"], _METADATA_VALUE_LIMIT)

    retry_after = parse_retry_after(headers.get("Retry-After"))
    retryable = kubernetes_retryable(status)
    if status == 401:
        message = (
            "the Kubernetes API server rejected the broker's own credentials "
            f"(HTTP 401: {message}); the caller's request was not the problem — the broker's "
            "Kubernetes credentials need fixing"
        )
    violations: list[FieldViolation] = []
    if status == 422:
        options = details.get("kind") == "CreateOptions"
        causes = details.get("causes")
        for cause in causes if isinstance(causes, list) else []:
            if not isinstance(cause, dict):
                continue
            violations.append(
                FieldViolation(
                    field=kubernetes_field_to_proto(str(cause.get("field") or ""), options=options),
                    description=str(cause.get("message") or ""),
                    reason=str(cause.get("reason") or ""),
                )
            )
    kept, _ = fit_violations(violations)
    # The relayed family KUBERNETES_<REASON> (broker.reasons): the code follows the status.
    error = BrokerError(
        code=kubernetes_code(status),
        message=truncate_utf8(message, MESSAGE_BUDGET),
        reason=kubernetes_reason(reason or "Unknown"),
        domain=KUBERNETES_DOMAIN,
        metadata=metadata,
        field_violations=kept,
        retry_after=retry_after if retryable else None,
    )
    return _Failure(
        error=error,
        retryable=retryable,
        retry_after=retry_after,
        detail=f"HTTP {status} {reason or 'Unknown'}",
    )


def _parse_status(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    if isinstance(data, dict) and data.get("kind") == "Status":
        return data
    return {}


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


# warn-code SP warn-agent SP warn-text [SP warn-date], comma-separated (RFC 7234 5.5).
_WARNING_RE = re.compile(
    r'\s*(\d{3})\s+(\S+)\s+"((?:[^"\\]|\\.)*)"(?:\s+"[^"]*")?\s*(?:,|$)', re.DOTALL
)


def parse_warnings(headers: Mapping[str, str]) -> tuple[str, ...]:
    """The texts of the `299` Warning headers, as client-go keeps them."""
    getall = getattr(headers, "getall", None)
    values: Sequence[str] = (
        getall("Warning", []) if getall else ([headers["Warning"]] if "Warning" in headers else [])
    )
    out: list[str] = []
    for value in values:
        pos = 0
        while pos < len(value):
            match = _WARNING_RE.match(value, pos)
            if match is None or match.end() == pos:
                break
            pos = match.end()
            if match.group(1) == "299":
                out.append(re.sub(r"\\(.)", r"\1", match.group(3)))
    return tuple(out)


def _check_kubeconfig_exists(path: Path | None) -> None:
    # Without this, a missing file surfaces as the library's "Expected key current-context".
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"kubernetes.kubeconfig: no such file: {path}")
        return
    candidates = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
    if not any(Path(p).expanduser().is_file() for p in candidates.split(os.pathsep) if p):
        raise ConfigError(
            "no kubeconfig found (set kubernetes.kubeconfig or KUBECONFIG, "
            "or run in a pod for the in-cluster config)"
        )
