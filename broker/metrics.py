"""Prometheus metrics: the gRPC server metrics and the broker's own, in one registry per broker.

Each `BrokerMetrics` owns a `CollectorRegistry` (not the process-wide default one), so several
brokers can run in one process (tests) without sharing counts; the admin listener exposes it
at /metrics.

- gRPC server metrics, named and labelled as the gRPC ecosystem's Prometheus middleware
  (go-grpc-prometheus) does, fed by CreateToken's adapter (`broker.service`) and, for the
  other services, by `broker.observe`.
- Domain metrics under `token_broker_`: base units, bounded label values only. Never a token,
  never a free-form caller string: `namespace` only counts issued tokens (a validated name the
  policy allowed), reasons are the fixed ErrorInfo reasons, the upstream `code` is an HTTP
  status. A `caller` label exists only with `metrics.callerLabels`, and then only for the
  first `metrics.callerLabelLimit` identities (the rest are `other`).
- Values other parts keep themselves (file reloads, lost audit lines, cache statistics,
  readiness, the Kubernetes API's last answer) are read when scraped, by a custom collector.
- The process (`process_*`: memory, CPU, open files, start time) and the interpreter
  (`python_info`, `python_gc_*`), from prometheus_client's own collectors.

The series every call counts in (the `grpc_server_*` ones, the calls in flight, the requested
and granted lifetimes, the policy decisions and issued tokens) are `LoopCounter`s and
`LoopHistogram`s: plain numbers, changed on the event loop where the calls run and read there
when /metrics is scraped (the admin listener serves on the same loop), so counting costs an
addition instead of a lock per increment, and stays exact. They expose exactly what
prometheus_client's Counter and Histogram would (names, help, labels, `le` buckets).
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
import prometheus_client
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker import __version__
from broker.config import MetricsSettings
from broker.upstream import AttemptOutcome

# `_created` series double the series count and are not part of the Prometheus text format the
# gRPC middleware of other languages exposes.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

# go-grpc-prometheus' grpc_type values.
GRPC_TYPES = ("unary", "client_stream", "server_stream", "bidi_stream")

# Seconds. Handling and upstream latency: milliseconds to the 30 s default request timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Token lifetimes: the API server's 10 min minimum to a week.
LIFETIME_BUCKETS = (600, 900, 1800, 3600, 7200, 14400, 28800, 43200, 86400, 172800, 604800)
# Time waited in a rate limiter.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# The API server's default expiration, which an absent expirationSeconds asks for.
DEFAULT_EXPIRATION_SECONDS = 3600
OTHER_CALLER = "other"


class RateLimitState(Protocol):
    """What RateLimiter keeps (broker.ratelimit)."""

    @property
    def redis_available(self) -> bool | None: ...

    def size(self) -> int: ...

    @property
    def stats(self) -> Any: ...


class FollowedFile(Protocol):
    """A file followed while serving (broker.file_reload.ReloadingFiles)."""

    what: str
    paths: tuple[Path, ...]
    reload_count: int
    reload_failures: int
    # Why the file's current content is refused; None while it is the content in force.
    last_error: str | None


class AuditState(Protocol):
    """What AuditLog keeps."""

    @property
    def lost_lines(self) -> int: ...

    @property
    def written_lines(self) -> int: ...

    @property
    def pending_lines(self) -> int: ...

    def problem(self) -> str | None: ...


class MemoState(Protocol):
    """broker.decision_memo.DecisionMemo, as the metrics read it."""

    @property
    def stats(self) -> Any: ...

    def __len__(self) -> int: ...


class CacheStats(Protocol):
    """Cumulative cache statistics (hits, misses, evictions since start) and its size now."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def upstream_calls_saved(self) -> int: ...


@dataclass(frozen=True)
class CacheSnapshot:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    size: int = 0
    upstream_calls_saved: int = 0


class BrokerMetrics:
    """All of one broker's metrics, in `registry`."""

    def __init__(self, settings: MetricsSettings | None = None) -> None:
        self.settings = settings if settings is not None else MetricsSettings()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")

        # --- gRPC server (go-grpc-prometheus names) ----------------------------------------
        self.grpc_started = LoopCounter(
            "grpc_server_started",
            "Total number of RPCs started on the server.",
            grpc_labels,
            registry=r,
        )
        self.grpc_handled = LoopCounter(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*grpc_labels, "grpc_code"),
            registry=r,
        )
        self.grpc_msg_received = LoopCounter(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server.",
            grpc_labels,
            registry=r,
        )
        self.grpc_msg_sent = LoopCounter(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server.",
            grpc_labels,
            registry=r,
        )
        self.grpc_handling_seconds = LoopHistogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            grpc_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # --- the HTTP door (broker.http_door; client_golang promhttp's names and labels) ----
        self.http_requests = LoopCounter(
            "http_server_requests",
            "HTTP requests answered by the HTTP door, by handler (the route template: "
            "kubernetes-token, oauth-token, or other for unknown paths), method and status code.",
            ("handler", "method", "code"),
            registry=r,
        )
        self.http_request_seconds = LoopHistogram(
            "http_server_request_duration_seconds",
            "Latency of the HTTP door's requests (seconds), from the request's headers to its "
            "answer, by handler and method.",
            ("handler", "method"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # --- requests and tokens ----------------------------------------------------------
        caller = ("caller",) if self.settings.caller_labels else ()
        self._callers: set[str] = set()
        # CreateToken calls being handled now (the request path counts them; read at scrape).
        self.in_flight_calls = 0
        self.tokens_issued = LoopCounter(
            "token_broker_tokens_issued",
            "Tokens handed out to callers (CreateToken answered OK), by namespace.",
            ("namespace", *caller),
            registry=r,
        )
        self.requested_lifetime = LoopHistogram(
            "token_broker_token_requested_lifetime_seconds",
            "Token lifetimes callers asked for (absent: the API server default, 3600 s), "
            "for valid, authenticated requests.",
            buckets=LIFETIME_BUCKETS,
            registry=r,
        )
        self.granted_lifetime = LoopHistogram(
            "token_broker_token_granted_lifetime_seconds",
            "Lifetimes of the tokens handed out, as their own claims say (exp - iat): what "
            "they are valid for, extensions by the API server included.",
            buckets=LIFETIME_BUCKETS,
            registry=r,
        )
        self.tokens_withheld = Counter(
            "token_broker_tokens_withheld",
            "Tokens minted (or taken from the cache) but not handed out, by the ErrorInfo "
            "reason of the refusal: TOKEN_LIFETIME_EXCEEDS_POLICY, AUDIT_UNAVAILABLE.",
            ("reason",),
            registry=r,
        )

        # --- upstream ---------------------------------------------------------------------
        self.upstream_requests = Counter(
            "token_broker_upstream_requests",
            "Requests (attempts) to the Kubernetes TokenRequest API by HTTP status; "
            'code="error": no answer (connection error), code="timeout": timed out.',
            ("code",),
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "token_broker_upstream_request_duration_seconds",
            "Latency of requests (attempts) to the Kubernetes TokenRequest API.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_retries = Counter(
            "token_broker_upstream_retries",
            "Retries of retryable upstream failures (connection errors, 429, 5xx).",
            registry=r,
        )

        # --- decisions --------------------------------------------------------------------
        self.policy_decisions = LoopCounter(
            "token_broker_policy_decisions",
            "Policy decisions by result (allowed, denied) and reason (ALLOWED or the "
            "ErrorInfo reason of the refusal).",
            ("result", "reason", *caller),
            registry=r,
        )
        self.authentication_failures = Counter(
            "token_broker_authentication_failures",
            "Calls refused as UNAUTHENTICATED, by the credential presented (jwt, apiKey, "
            "mtls, bearer: a malformed authorization header or one the checks could not "
            "process, none) and ErrorInfo reason.",
            ("method", "reason"),
            registry=r,
        )
        self.rate_limit_refusals = Counter(
            "token_broker_rate_limit_refusals",
            "Calls refused by a rate limiter, by its scope: caller, serviceaccount, global "
            "(RESOURCE_EXHAUSTED), peer (failed authentication per peer address, "
            "RESOURCE_EXHAUSTED), upstream and upstream_retry_after (UNAVAILABLE).",
            ("scope",),
            registry=r,
        )
        self.rate_limit_wait_seconds = Histogram(
            "token_broker_rate_limit_wait_seconds",
            "Time calls waited in a rate limiter before going on, by its scope.",
            ("scope",),
            buckets=WAIT_BUCKETS,
            registry=r,
        )

        self.calls_shed = Counter(
            "token_broker_calls_shed",
            "Calls the broker ended or refused to protect itself, by ErrorInfo reason: "
            "TOO_MANY_PENDING_CALLS (shed at once, UNAVAILABLE), REQUEST_RECEIVE_TIMEOUT (no "
            "request message in time, DEADLINE_EXCEEDED).",
            ("reason",),
            registry=r,
        )

        self.build_info = Gauge(
            "token_broker_build_info",
            "Always 1; the labels name the running versions.",
            ("version", "python_version", "grpc_version"),
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version(), grpc.__version__).set(1)

        # Read at scrape time.
        self._state = _StateCollector(self)
        r.register(self._state)
        # What an operator graphs first: memory, CPU, open files, start time (process_*, Linux
        # only: the collector reads /proc), the interpreter (python_info) and its garbage
        # collector (python_gc_*). Per process: each worker of `serve --workers N` has its own.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    # --- gRPC -----------------------------------------------------------------------------

    def grpc_method(self, grpc_type: str, service: str, method: str) -> GrpcMethodMetrics:
        """A method's series, created at zero as go-grpc-prometheus' InitializeMetrics does
        (so rates and ratios exist before the first call), and resolved once for its calls."""
        return GrpcMethodMetrics(self, grpc_type, service, method)

    # --- domain ---------------------------------------------------------------------------

    def _caller(self, name: str | None) -> tuple[str, ...]:
        if not self.settings.caller_labels:
            return ()
        if name is None:
            return ("",)
        if name in self._callers:
            return (name,)
        if len(self._callers) < self.settings.caller_label_limit:
            self._callers.add(name)
            return (name,)
        return (OTHER_CALLER,)

    def token_issued(
        self, namespace: str, lifetime_seconds: int | None, caller: str | None = None
    ) -> None:
        """A token handed out; `lifetime_seconds`: its own (exp - iat), None when unknown."""
        self.token_handed_out(self.issued_series(namespace, caller), lifetime_seconds)

    def issued_series(self, namespace: str, caller: str | None = None) -> Any:
        """The `token_broker_tokens_issued` series of a namespace and caller (the request
        path resolves it once per distinct call: broker.decision_memo)."""
        return self.tokens_issued.labels(namespace, *self._caller(caller))

    def token_handed_out(self, series: Any, lifetime_seconds: int | None) -> None:
        """A token handed out, counted in `series` (`issued_series`)."""
        series.inc()
        if lifetime_seconds is not None:
            self.granted_lifetime.observe(lifetime_seconds)

    def token_withheld(self, reason: str) -> None:
        """A call had a token and did not hand it out (`reason`: the refusal's)."""
        self.tokens_withheld.labels(reason).inc()

    def token_requested(self, expiration_seconds: int | None) -> None:
        self.requested_lifetime.observe(self.requested_lifetime_value(expiration_seconds))

    @staticmethod
    def requested_lifetime_value(expiration_seconds: int | None) -> float:
        """What `token_requested` observes for a request's expirationSeconds."""
        return DEFAULT_EXPIRATION_SECONDS if expiration_seconds is None else expiration_seconds

    def policy_decision(self, allowed: bool, reason: str, caller: str | None = None) -> None:
        self.decision_series(allowed, reason, caller).inc()

    def decision_series(self, allowed: bool, reason: str, caller: str | None = None) -> Any:
        """The `token_broker_policy_decisions` series of a decision (resolved once per
        distinct call: broker.decision_memo)."""
        result = "allowed" if allowed else "denied"
        return self.policy_decisions.labels(result, reason, *self._caller(caller))

    def authentication_failure(self, method: str, reason: str) -> None:
        self.authentication_failures.labels(method, reason).inc()

    def rate_limit_refused(self, scope: str) -> None:
        """A call refused by the `scope` limiter (caller, serviceaccount, global, upstream,
        upstream_retry_after)."""
        self.rate_limit_refusals.labels(scope).inc()

    def call_shed(self, reason: str) -> None:
        """A call ended or refused to protect the broker (`reason`: its ErrorInfo reason)."""
        self.calls_shed.labels(reason).inc()

    def rate_limit_waited(self, scope: str, seconds: float) -> None:
        """A call waited `seconds` in the `scope` limiter, then went on."""
        self.rate_limit_wait_seconds.labels(scope).observe(seconds)

    # UpstreamObserver
    def upstream_attempt(self, outcome: AttemptOutcome) -> None:
        self.upstream_requests.labels(outcome.code).inc()
        self.upstream_seconds.observe(outcome.seconds)

    def upstream_retry(self) -> None:
        self.upstream_retries.inc()

    # --- read at scrape time --------------------------------------------------------------

    def watch_rate_limiter(self, source: RateLimitState | None) -> None:
        """Export the limiter's bucket count, Redis state and Redis failures at each scrape."""
        self._state.rate_limiter = source

    def watch_files(
        self,
        files: Callable[[], Sequence[FollowedFile]] | None,
        certificate_expiry: Callable[[], datetime] | None = None,
    ) -> None:
        """Export the reload counters of the followed files, and the serving certificate's
        expiry, at each scrape."""
        self._state.files = files
        self._state.certificate_expiry = certificate_expiry

    def watch_audit(self, source: AuditState | None) -> None:
        self._state.audit = source

    def watch_memo(self, memo: MemoState | None) -> None:
        """Export the decision memo's counters (and the calls in flight) at each scrape."""
        self._state.memo = memo

    def watch_readiness(self, ready: Callable[[], bool] | None) -> None:
        self._state.ready = ready

    def watch_kubernetes_api(self, last_success: Callable[[], float | None] | None) -> None:
        """Export when the Kubernetes API server last answered (seconds since the epoch;
        None: not yet), as readiness counts answers."""
        self._state.kubernetes_api_last_success = last_success

    def watch_cache(self, stats: Callable[[], CacheStats] | None) -> None:
        """Read the cache's statistics at every scrape (e.g. `lambda: cache.stats`)."""
        self._state.cache_source = stats

    def update_cache(self, stats: CacheStats) -> None:
        """Set the cache statistics exported until the next update (cumulative counts)."""
        self._state.cache = CacheSnapshot(
            stats.hits, stats.misses, stats.evictions, stats.size, stats.upstream_calls_saved
        )


class GrpcMethodMetrics:
    """One gRPC method's server series, their labels resolved once: counting a call then
    costs no label lookups (five per call otherwise, on every call's path)."""

    def __init__(self, metrics: BrokerMetrics, grpc_type: str, service: str, method: str):
        labels = (grpc_type, service, method)
        self.started = metrics.grpc_started.labels(*labels)
        self.msg_received = metrics.grpc_msg_received.labels(*labels)
        self.msg_sent = metrics.grpc_msg_sent.labels(*labels)
        self.handling_seconds = metrics.grpc_handling_seconds.labels(*labels)
        self.handled = {
            code: metrics.grpc_handled.labels(*labels, code.name) for code in grpc.StatusCode
        }


class _StateCollector(Collector):
    """Values kept elsewhere, read when scraped."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self.metrics = metrics
        self.memo: MemoState | None = None
        self.audit: AuditState | None = None
        self.ready: Callable[[], bool] | None = None
        self.kubernetes_api_last_success: Callable[[], float | None] | None = None
        self.cache_source: Callable[[], CacheStats] | None = None
        self.cache = CacheSnapshot()
        self.rate_limiter: RateLimitState | None = None
        self.files: Callable[[], Sequence[FollowedFile]] | None = None
        self.certificate_expiry: Callable[[], datetime] | None = None

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "token_broker_in_flight_requests",
            "CreateToken calls being handled now.",
            value=self.metrics.in_flight_calls,
        )
        memo = self.memo
        if memo is not None:
            memo_ = "token_broker_decision_memo_"
            yield CounterMetricFamily(
                memo_ + "hits",
                "CreateToken calls whose decision (validation, policy, effective request, "
                "cache key) was remembered from an identical earlier call under the policy in "
                "force.",
                value=memo.stats.hits,
            )
            yield CounterMetricFamily(
                memo_ + "misses",
                "Authenticated CreateToken calls decided anew.",
                value=memo.stats.misses,
            )
            yield GaugeMetricFamily(memo_ + "entries", "Decisions remembered now.", value=len(memo))
        yield from self._collect_files()
        limiter = self.rate_limiter
        if limiter is not None:
            yield GaugeMetricFamily(
                "token_broker_rate_limit_buckets",
                "Rate-limit buckets held in this process's memory (idle ones are evicted).",
                value=limiter.size(),
            )
            yield CounterMetricFamily(
                "token_broker_rate_limit_redis_failures",
                "Redis calls of the shared rate limiter that failed (connection, timeout, error).",
                value=limiter.stats.redis_failures,
            )
            yield CounterMetricFamily(
                "token_broker_rate_limit_local_checks",
                "Calls limited locally because Redis was unavailable (onRedisUnavailable: local).",
                value=limiter.stats.local_checks,
            )
            available = limiter.redis_available
            if available is not None:
                yield GaugeMetricFamily(
                    "token_broker_rate_limit_redis_up",
                    "1 while the shared rate limiter's Redis answers, else 0.",
                    value=int(available),
                )
        yield from self._collect_audit()
        stats: CacheStats = self.cache_source() if self.cache_source is not None else self.cache
        cache = "token_broker_cache_"
        yield CounterMetricFamily(
            cache + "hits", "Token requests answered from the cache.", value=stats.hits
        )
        yield CounterMetricFamily(
            cache + "misses", "Token requests the cache could not answer.", value=stats.misses
        )
        yield CounterMetricFamily(
            cache + "evictions", "Tokens evicted from the cache.", value=stats.evictions
        )
        yield GaugeMetricFamily(cache + "entries", "Tokens in the cache now.", value=stats.size)
        yield CounterMetricFamily(
            cache + "upstream_calls_saved",
            "Token requests that made no API call of their own: hits, and requests that "
            "joined an identical request's call (single flight).",
            value=stats.upstream_calls_saved,
        )
        if self.ready is not None:
            yield GaugeMetricFamily(
                "token_broker_ready",
                "1 when the broker is ready (policy loaded, audit log writable, Kubernetes API "
                "reachable), else 0.",
                value=1 if self.ready() else 0,
            )
        if self.kubernetes_api_last_success is not None:
            last_success = self.kubernetes_api_last_success()
            yield GaugeMetricFamily(
                "token_broker_kubernetes_api_last_success_timestamp_seconds",
                "When the Kubernetes API server last answered a call or the readiness probe "
                "with a non-5xx status, in seconds since the epoch; 0: not yet.",
                value=last_success if last_success is not None else 0,
            )

    def _collect_audit(self) -> Iterator[Metric]:
        audit = self.audit
        yield CounterMetricFamily(
            "token_broker_audit_lines_written",
            "Audit lines written to the sink.",
            value=audit.written_lines if audit is not None else 0,
        )
        yield CounterMetricFamily(
            "token_broker_audit_lines_lost",
            "Audit lines never written although their call went on (audit.failClosed off), "
            "or that were written without waiting (a refusal's own line): the write failed, "
            "the queue was full, or the sink was still blocked at shutdown.",
            value=audit.lost_lines if audit is not None else 0,
        )
        if audit is not None:
            yield GaugeMetricFamily(
                "token_broker_audit_lines_pending",
                "Audit lines queued or being written now (at most audit.maxQueuedLines).",
                value=audit.pending_lines,
            )
            yield GaugeMetricFamily(
                "token_broker_audit_sink_up",
                "1 while the audit sink takes lines; 0 while it is blocked (a write outstanding "
                "longer than audit.writeTimeoutSeconds) or its last write failed.",
                value=int(audit.problem() is None),
            )

    def _collect_files(self) -> Iterator[Metric]:
        labels = ("source", "file")
        reloads = CounterMetricFamily(
            "token_broker_file_reloads",
            "Reloads of a followed file (policy, TLS certificate, API key file, JWKS file) that "
            "installed its new content; `file` is its (first) path.",
            labels=labels,
        )
        failures = CounterMetricFamily(
            "token_broker_file_reload_failures",
            "Versions of a followed file that were refused (the last good one stayed in force).",
            labels=labels,
        )
        successful = GaugeMetricFamily(
            "token_broker_file_last_reload_successful",
            "1 while a followed file's content is the one in force; 0 while its current "
            "content is refused (the last good one stays in force until the file is fixed).",
            labels=labels,
        )
        for followed in self.files() if self.files is not None else ():
            values = [followed.what.lower().replace(" ", "_"), str(followed.paths[0])]
            reloads.add_metric(values, followed.reload_count)
            failures.add_metric(values, followed.reload_failures)
            successful.add_metric(values, int(followed.last_error is None))
        yield reloads
        yield failures
        yield successful
        if self.certificate_expiry is not None:
            yield GaugeMetricFamily(
                "token_broker_tls_certificate_expiry_timestamp_seconds",
                "When the serving certificate (server.tls.certFile, as last loaded) expires, "
                "in seconds since the epoch: alert well before it.",
                value=self.certificate_expiry().timestamp(),
            )


class LoopCounter(Collector):
    """A Counter (as prometheus_client exposes one) counted with plain numbers on the event
    loop: `labels(...)` gives a series whose `inc()` is an addition. Event loop only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], _Count] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Count:
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values expected")
            series = self._series[key] = _Count()
        return series

    def inc(self, amount: float = 1) -> None:
        self.labels().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, series in self._series.items():
            family.add_metric(key, series.value)
        yield family


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class LoopHistogram(Collector):
    """A Histogram (as prometheus_client exposes one) counted with plain numbers on the event
    loop. Event loop only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        bounds = [float(b) for b in buckets]
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self._bounds = tuple(bounds)
        self._les = tuple(floatToGoString(b) for b in bounds)  # type: ignore[no-untyped-call]
        self._series: dict[tuple[str, ...], _Observed] = {}
        if not self._labelnames:
            self._series[()] = _Observed(self._bounds)
        registry.register(self)

    def labels(self, *values: str) -> _Observed:
        key = tuple(str(v) for v in values)
        series = self._series.get(key)
        if series is None:
            if len(key) != len(self._labelnames):
                raise ValueError(f"{self._name}: {len(self._labelnames)} label values expected")
            series = self._series[key] = _Observed(self._bounds)
        return series

    def observe(self, amount: float) -> None:
        self._series[()].observe(amount)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for key, series in self._series.items():
            cumulative = 0.0
            buckets = []
            for le, count in zip(self._les, series.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(key, buckets, series.sum)
        yield family


class _Observed:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (`le`), as prometheus_client's.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount
