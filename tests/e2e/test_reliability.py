"""The reliability suite (issue 9): faults, fuzzed input, overload, shutdown, and secrets.

Everything goes through the real stack: a grpc.aio client -> BrokerServer (in process, or
`python -m broker serve` for the SIGTERM test) -> kubernetes.aio -> the API-server emulator
over HTTPS. Faults are injected with the emulator's knobs and what reached the API server is
counted by the emulator. No timing assertions: every wait is bounded, and the bounds below
only stop a hung test.

1. Faults (test_fault_*): latency past the caller's deadline, 500s, 503s, 429 with
   Retry-After (within and beyond the deadline), dropped connections, the emulator down and
   back on the same port. Each ends with the expected gRPC code and upstream request count
   (the retry settings, never an attempt after the call ended), no hung RPC (emulator and
   broker in-flight back to 0, every started call handled), no leaked asyncio task, and a
   normal call succeeding afterwards.
2. Bad input (test_fuzz_*): hypothesis fills every CreateTokenRequest field. Never INTERNAL or
   UNKNOWN; INVALID_ARGUMENT/REQUEST_INVALID exactly when the broker's own
   validate_create_token raises (with its message), and then no upstream request; health
   SERVING at the end.
3. Overload (test_overload_*): OVERLOAD_CALLS calls from OVERLOAD_TASKS tasks far above the
   limits: only OK / RESOURCE_EXHAUSTED / UNAVAILABLE, at most maxConcurrent requests at the
   emulator at once, RSS growth below RSS_GROWTH_LIMIT_BYTES, and normal service right after.
4. Shutdown (test_sigterm_*): SIGTERM during load on a broker process: in-flight calls
   complete OK, new calls are refused UNAVAILABLE, exit 0 within shutdownGraceSeconds.
5. Secrets (marked `last_in_module`): no issued token and no credential (the caller's API key,
   the broker's own Kubernetes credential) in anything this module captured: log records of
   every logger at DEBUG, audit lines, /metrics of every broker it ran, the child broker's
   output, and every error message and trailer received. tests/test_secrets_suite.py does
   the same over the whole suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import AuditSettings, KubernetesSettings
from broker.emulator import Emulator
from broker.errors import (
    ERROR_DOMAIN,
    KUBERNETES_DOMAIN,
    BrokerError,
    RichStatus,
    rich_status_from_call,
)
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.gen.tokenbroker.v1 import token_broker_pb2_grpc as pb_grpc
from broker.reasons import Reason
from broker.server import SERVICE_NAME, BrokerServer
from broker.validation import validate_create_token
from tests.support.cli import serve_config, start_broker
from tests.support.fuzz import FUZZ_SETTINGS
from tests.support.stack import (
    BROKER_TOKEN,
    CALLER_KEY,
    NAMESPACE,
    NODE,
    OTHER_NAMESPACE,
    OTHER_POD,
    OTHER_SERVICE_ACCOUNT,
    POD,
    SECRET,
    SERVICE_ACCOUNT,
    TEST_RETRY,
    BearerCredential,
    broker_settings,
    create_request,
)
from tests.support.suite_secrets import record_text

OK = grpc.StatusCode.OK
SERVING = health_pb2.HealthCheckResponse.SERVING

# Bounds of the waits (not assertions on speed: a hung test fails at these).
DRAIN_TIMEOUT = 10.0
TASKS_TIMEOUT = 10.0


# --- what the module saw, for the final secrets scan ----------------------------------------

# (source, text) of everything captured: log records, audit lines, /metrics, error
# messages and trailers, the child broker's output.
CAPTURED: list[tuple[str, str]] = []
# Every token handed out to this module's calls.
ISSUED: set[str] = set()
# The kinds of source the tests that ran promise to have captured (the scan's coverage).
EXPECTED_SOURCES: set[str] = {"log", "grpc"}


def capture(source: str, text: str) -> None:
    CAPTURED.append((source, text))


class _Collector(logging.Handler):
    """Keeps the full text of every record: message, extra fields, exception, stack."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            capture(f"log:{record.name}", record_text(record))
        except Exception:
            self.handleError(record)


@pytest.fixture(scope="module", autouse=True)
def _collect_all_logs() -> Iterator[None]:
    """Every logger at DEBUG for the whole module, every record collected."""
    root = logging.getLogger()
    collector = _Collector(level=logging.DEBUG)
    saved = {"": root.level}
    root.setLevel(logging.DEBUG)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level > logging.DEBUG:
            saved[name] = logger.level
            logger.setLevel(logging.DEBUG)
    root.addHandler(collector)
    try:
        yield
    finally:
        root.removeHandler(collector)
        for name, level in saved.items():
            logging.getLogger(name or None).setLevel(level)


def remember_error(err: aio.AioRpcError) -> RichStatus:
    status = rich_status_from_call(err)
    capture("grpc:details", err.details() or "")
    capture("grpc:debug", err.debug_error_string() or "")
    capture("grpc:trailers", repr(err.trailing_metadata()))
    capture("grpc:initial-metadata", repr(err.initial_metadata()))
    capture("grpc:status", repr(status))
    return status


def remember_response(response: pb.CreateTokenResponse) -> None:
    token = response.token_request.status.token
    assert token, "an OK answer without a token"
    ISSUED.add(token)
    capture("grpc:warnings", "\n".join(response.warnings))


async def call(
    stub: pb_grpc.TokenBrokerServiceStub,
    request: pb.CreateTokenRequest | None = None,
    *,
    timeout: float = 10.0,
) -> RichStatus | None:
    """One CreateToken: None when OK (the token remembered), else the decoded status."""
    try:
        response = await stub.CreateToken(
            request if request is not None else create_request(), timeout=timeout
        )
    except aio.AioRpcError as err:
        return remember_error(err)
    remember_response(response)
    return None


def code_of(status: RichStatus | None) -> grpc.StatusCode:
    return OK if status is None else status.code


def reason_of(status: RichStatus | None) -> str | None:
    if status is None or status.error_info is None:
        return None
    return str(status.error_info.reason)


def retry_seconds(status: RichStatus) -> float:
    assert status.retry_info is not None, "expected RetryInfo"
    delay = status.retry_info.retry_delay
    return float(delay.seconds + delay.nanos / 1e9)


# --- brokers built here: audit lines to a file, /metrics scraped at the end -----------------


async def scrape_metrics(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{url}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


@contextlib.asynccontextmanager
async def running_broker(
    kube: KubernetesSettings,
    directory: Path,
    *,
    cache: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    **server: Any,
) -> AsyncIterator[BrokerServer]:
    """A BrokerServer (stack settings) whose audit lines go to a file in `directory`."""
    audit_file = directory / "audit.jsonl"
    cfg = broker_settings(kube, cache=cache, rate_limit=rate_limit, **server)
    cfg = cfg.model_copy(update={"audit": AuditSettings(sink="file", file=audit_file)})
    broker = BrokerServer(cfg)
    EXPECTED_SOURCES.update({"audit", "metrics"})
    await broker.start()
    try:
        yield broker
    finally:
        try:
            assert broker.admin_url is not None
            capture("metrics", await scrape_metrics(broker.admin_url))
        finally:
            await broker.stop(None)
            if audit_file.exists():
                capture("audit", audit_file.read_text(encoding="utf-8"))


@contextlib.asynccontextmanager
async def caller_stub(
    address: str, *, own_connection: bool = False
) -> AsyncIterator[pb_grpc.TokenBrokerServiceStub]:
    """A stub whose calls carry the test caller's API key. `own_connection`: not shared
    with the process's other channels to the same address (gRPC's global subchannel pool)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    async with aio.insecure_channel(
        address, options=options, interceptors=[BearerCredential(CALLER_KEY)]
    ) as channel:
        yield pb_grpc.TokenBrokerServiceStub(channel)


async def health(address: str) -> int:
    async with aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        return int(response.status)


# --- "no hung RPC", "no leaked task" --------------------------------------------------------


def create_token_calls(broker: BrokerServer) -> tuple[int, int, int]:
    """(started, handled, in flight) CreateToken calls, from the broker's own metrics."""
    started = handled = 0
    in_flight = 0.0
    for family in broker.metrics.registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "token_broker_in_flight_requests":
                in_flight += sample.value
            if labels.get("grpc_method") != "CreateToken":
                continue
            if sample.name == "grpc_server_started_total":
                started += int(sample.value)
            elif sample.name == "grpc_server_handled_total":
                handled += int(sample.value)
    return started, handled, int(in_flight)


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.02)


async def drained(emulator: Emulator, broker: BrokerServer) -> None:
    """No request left at the emulator, no CreateToken call left in the broker."""
    await wait_until(lambda: emulator.in_flight == 0, DRAIN_TIMEOUT, "emulator in-flight 0")

    def broker_idle() -> bool:
        started, handled, in_flight = create_token_calls(broker)
        return started == handled and in_flight == 0

    await wait_until(broker_idle, DRAIN_TIMEOUT, "every CreateToken call handled")


# Tasks that legitimately outlive a call: an HTTP keep-alive connection's handler (aiohttp,
# one per pooled connection to the emulator or the admin listener) and the gRPC server's
# "wait for the next call" task, which it starts again for every call it takes.
LONG_LIVED_TASKS = frozenset(
    {
        "RequestHandler.start",
        "AioServer._request_call",
        "AioServer._request_registered_call",
    }
)


def _long_lived(task: asyncio.Task[Any]) -> bool:
    return getattr(task.get_coro(), "__qualname__", "") in LONG_LIVED_TASKS


def describe(tasks: set[asyncio.Task[Any]]) -> str:
    out = []
    for t in tasks:
        coro = t.get_coro()
        out.append(f"{t.get_name()}: {getattr(coro, '__qualname__', coro)!s} {t.get_stack()}")
    return "; ".join(out)


async def no_new_tasks(before: set[asyncio.Task[Any]]) -> None:
    """Every task started since `before` (but this one and keep-alive connections) ends."""
    me = asyncio.current_task()

    def leftover() -> set[asyncio.Task[Any]]:
        return {
            t
            for t in asyncio.all_tasks()
            if t is not me and t not in before and not t.done() and not _long_lived(t)
        }

    deadline = time.monotonic() + TASKS_TIMEOUT
    while left := leftover():
        assert time.monotonic() < deadline, f"leaked tasks: {describe(left)}"
        await asyncio.sleep(0.02)


# --- 1. faults through a real broker ----------------------------------------------------------

MAX_ATTEMPTS = int(TEST_RETRY["max_attempts"])
# Longer than the suite's largest retry backoff (TEST_RETRY max_backoff_seconds: 0.05 s): an
# attempt still coming after this long after the call ended would be a retry past its end.
QUIET_SECONDS = 0.3


class Rig:
    def __init__(
        self, emulator: Emulator, broker: BrokerServer, stub: pb_grpc.TokenBrokerServiceStub
    ) -> None:
        self.emulator = emulator
        self.broker = broker
        self.stub = stub


@pytest.fixture
async def rig(
    emulator: Emulator, kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> AsyncIterator[Rig]:
    """A broker (no cache, no rate limits) on the emulator, warmed up by one normal call."""
    async with (
        running_broker(kubernetes_settings, tmp_path) as broker,
        caller_stub(broker.address) as stub,
    ):
        assert await call(stub) is None
        emulator.reset_counters()
        yield Rig(emulator, broker, stub)


@contextlib.asynccontextmanager
async def fault_case(
    rig: Rig, *, recover_with: pb.CreateTokenRequest | None = None
) -> AsyncIterator[None]:
    """Around one fault: afterwards nothing hangs, no attempt comes after the call ended,
    no task is left behind, and (faults cleared) a normal call succeeds."""
    before = set(asyncio.all_tasks())
    yield
    await drained(rig.emulator, rig.broker)
    count = rig.emulator.token_request_count
    await asyncio.sleep(QUIET_SECONDS)
    assert rig.emulator.token_request_count == count, "an upstream attempt after the call ended"
    rig.emulator.faults.reset()
    assert await call(rig.stub, recover_with) is None, "no recovery after the fault"
    await drained(rig.emulator, rig.broker)
    await no_new_tasks(before)


async def test_fault_latency_beyond_the_deadline(rig: Rig) -> None:
    rig.emulator.faults.latency = 1.5  # left in place: the held request must drain by itself
    async with fault_case(rig):
        status = await call(rig.stub, timeout=0.4)
        assert code_of(status) == grpc.StatusCode.DEADLINE_EXCEEDED
        # One attempt, cut by the deadline; none started after it.
        assert rig.emulator.token_request_count == 1


FAULTS = {
    # kind: (inject count, ErrorInfo reason, domain) of the final refusal
    "500": (
        lambda e, n: e.faults.fail_next(n, 500),
        Reason.KUBERNETES_INTERNAL_ERROR,
        KUBERNETES_DOMAIN,
    ),
    "503": (
        lambda e, n: e.faults.fail_next(n, 503),
        Reason.KUBERNETES_SERVICE_UNAVAILABLE,
        KUBERNETES_DOMAIN,
    ),
    "drop": (lambda e, n: e.faults.drop_next(n), Reason.KUBERNETES_UNREACHABLE, ERROR_DOMAIN),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
async def test_fault_transient_is_retried(rig: Rig, kind: str) -> None:
    inject, _, _ = FAULTS[kind]
    async with fault_case(rig):
        inject(rig.emulator, 2)
        assert await call(rig.stub) is None
        assert rig.emulator.token_request_count == 3


@pytest.mark.parametrize("kind", sorted(FAULTS))
async def test_fault_persistent_exhausts_the_retries(rig: Rig, kind: str) -> None:
    inject, reason, domain = FAULTS[kind]
    async with fault_case(rig):
        inject(rig.emulator, 10 * MAX_ATTEMPTS)
        status = await call(rig.stub)
        assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE, status
        assert status.error_info is not None
        assert (status.error_info.reason, status.error_info.domain) == (reason, domain)
        assert retry_seconds(status) > 0
        assert rig.emulator.token_request_count == MAX_ATTEMPTS


@pytest.mark.retry(max_attempts=20)
async def test_fault_slow_503s_retried_only_within_the_deadline(rig: Rig) -> None:
    latency, deadline = 0.3, 1.0
    rig.emulator.faults.latency = latency
    async with fault_case(rig):
        rig.emulator.faults.fail_next(40, 503)
        status = await call(rig.stub, timeout=deadline)
        # Out of time for another attempt (UNAVAILABLE), or cut by the deadline.
        assert code_of(status) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), status
        # Every attempt takes `latency` and all of them fit in the deadline: far fewer
        # than max_attempts.
        assert 1 <= rig.emulator.token_request_count <= int(deadline / latency)


async def test_fault_429_retry_after_within_the_deadline(rig: Rig) -> None:
    async with fault_case(rig):
        rig.emulator.faults.fail_next(1, 429, retry_after=1)
        assert await call(rig.stub, timeout=10) is None
        assert rig.emulator.token_request_count == 2


async def test_fault_429_retry_after_beyond_the_deadline(rig: Rig) -> None:
    # 5 s: within max_retry_after_seconds (TEST_RETRY), beyond the 1 s deadline.
    other = create_request(service_account=OTHER_SERVICE_ACCOUNT)
    async with fault_case(rig, recover_with=other):
        rig.emulator.faults.fail_next(1, 429, retry_after=5)
        status = await call(rig.stub, timeout=1.0)
        assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE, status
        assert reason_of(status) == Reason.KUBERNETES_TOO_MANY_REQUESTS
        assert retry_seconds(status) == 5
        assert rig.emulator.token_request_count == 1
        # The service account is held back for the Retry-After, without calling the API
        # server; other service accounts are not (the recovery call).
        status = await call(rig.stub, timeout=10)
        assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE, status
        assert reason_of(status) == Reason.UPSTREAM_THROTTLED
        assert rig.emulator.token_request_count == 1


async def test_fault_emulator_down_then_back(rig: Rig) -> None:
    port = rig.emulator.port
    async with fault_case(rig):
        await rig.emulator.stop()
        status = await call(rig.stub)
        assert status is not None and status.code == grpc.StatusCode.UNAVAILABLE, status
        assert reason_of(status) == Reason.KUBERNETES_UNREACHABLE
        assert retry_seconds(status) > 0
        assert rig.emulator.token_request_count == 0
        await rig.emulator.start()  # same port, CA and signing key
        assert rig.emulator.port == port


# --- 2. bad input: every CreateTokenRequest field fuzzed ------------------------------------

# Audiences the core-tests policy allows (tests/data/core-policy.yaml).
ALLOWED_AUDIENCES = [
    "https://vault.example.com",
    "sts.example.com",
    "https://a.example",
    "https://b.example",
]
# Non-ASCII and odd characters: NUL, RTL/LTR marks and overrides, combining, BOM, line and
# paragraph separators, emoji (never surrogates: proto strings are UTF-8).
ODD = "\x00\x01\x7f\u202e\u202d\u200f\u200e\u0301\ufeff\u2028\u2029\u00e9\u00df\U0001f600\t\n "
_characters = st.characters(exclude_categories=("Cs",))
odd_text = st.text(st.one_of(_characters, st.sampled_from(ODD)), max_size=40)
# Long strings, cheaply: one character repeated (beyond every length limit).
huge_text = st.builds(
    lambda ch, n: ch * n, st.one_of(_characters, st.just("a")), st.integers(1025, 6000)
)
dns_like = st.from_regex(r"[a-z0-9]([-a-z0-9.]{0,70}[a-z0-9])?", fullmatch=True)
names = st.one_of(dns_like, odd_text, huge_text, st.sampled_from(["a" * 63, "a" * 64, "a" * 254]))
FIELDS = (
    "namespace",
    "service_account",
    "metadata.name",
    "metadata.namespace",
    "audiences",
    "expiration_seconds",
    "bound_object_ref",
    "dry_run",
    "field_manager",
    "field_validation",
)


def bound_refs(names_: st.SearchStrategy[str]) -> st.SearchStrategy[pb.BoundObjectReference]:
    return st.builds(
        pb.BoundObjectReference,
        kind=st.one_of(
            st.sampled_from(["Pod", "Secret", "Node", "", "pod", "Deployment"]), odd_text
        ),
        api_version=st.one_of(
            st.sampled_from(["", "v1", "/v1", "/", "v2", "apps/v1", "a/b/c"]), odd_text
        ),
        name=st.one_of(st.sampled_from([POD, OTHER_POD, SECRET, NODE, ""]), names_),
        uid=st.one_of(st.just(""), odd_text),
    )


# References the API server can resolve (or 404 / 409 / 400 on the cluster's state).
plausible_refs = st.builds(
    pb.BoundObjectReference,
    kind=st.sampled_from(["Pod", "Secret", "Node"]),
    api_version=st.sampled_from(["", "v1"]),
    name=st.sampled_from([POD, OTHER_POD, SECRET, NODE, "missing"]),
    uid=st.one_of(st.just(""), dns_like),
)


@st.composite
def create_token_requests(draw: st.DrawFn) -> pb.CreateTokenRequest:
    """About half the requests have every field plausible (so that they get past validation:
    to the policy, the API server, a token); the others have one to three fields drawn from
    anything at all."""
    broken = draw(
        st.one_of(
            st.just(frozenset[str]()),
            st.frozensets(st.sampled_from(FIELDS), min_size=1, max_size=3),
        )
    )

    def pick(field: str, plausible: st.SearchStrategy[Any], wild: st.SearchStrategy[Any]) -> Any:
        return draw(wild if field in broken else plausible)

    namespace = pick(
        "namespace",
        st.sampled_from([NAMESPACE, NAMESPACE, OTHER_NAMESPACE, "nope"]),
        st.one_of(st.just(""), names),
    )
    service_account = pick(
        "service_account",
        st.sampled_from([SERVICE_ACCOUNT, SERVICE_ACCOUNT, OTHER_SERVICE_ACCOUNT, "nobody"]),
        st.one_of(st.just(""), names),
    )
    metadata = pb.ObjectMeta(
        name=pick("metadata.name", st.sampled_from(["", service_account]), names),
        namespace=pick("metadata.namespace", st.sampled_from(["", namespace]), names),
    )
    spec = pb.TokenRequestSpec(
        audiences=pick(
            "audiences",
            st.lists(st.sampled_from([*ALLOWED_AUDIENCES, "vault"]), max_size=4),
            st.lists(
                st.one_of(st.sampled_from([*ALLOWED_AUDIENCES, "", "vault"]), odd_text, huge_text),
                max_size=50,
            ),
        )
    )
    expiration = pick(
        "expiration_seconds",
        st.one_of(st.none(), st.integers(600, 2**32)),
        st.one_of(
            st.sampled_from([-(2**63), -1, 0, 1, 599, 2**32 + 1, 2**63 - 1]),
            st.integers(-(2**63), 2**63 - 1),
        ),
    )
    if expiration is not None:
        spec.expiration_seconds = expiration
    bound = pick("bound_object_ref", st.one_of(st.none(), plausible_refs), bound_refs(names))
    if bound is not None:
        spec.bound_object_ref.CopyFrom(bound)
    return pb.CreateTokenRequest(
        namespace=namespace,
        service_account=service_account,
        token_request=pb.TokenRequest(metadata=metadata, spec=spec),
        dry_run=pick(
            "dry_run",
            st.sampled_from([[], ["All"], ["All", "All"]]),
            st.lists(st.one_of(st.sampled_from(["All", "all", "", "None"]), odd_text), max_size=5),
        ),
        field_manager=pick(
            "field_manager",
            st.one_of(st.sampled_from(["", "kubectl", "m" * 128]), dns_like),
            st.one_of(st.just("m" * 129), odd_text, huge_text),
        ),
        field_validation=pick(
            "field_validation",
            st.sampled_from(["", "Ignore", "Warn", "Strict"]),
            st.one_of(st.just("strict"), odd_text),
        ),
    )


def local_verdict(req: pb.CreateTokenRequest) -> BrokerError | None:
    """What the broker's own validation says of the request (None: valid)."""
    try:
        validate_create_token(req)
    except BrokerError as err:
        return err
    return None


# Outcomes of a valid request: issued, or refused by the policy (audiences), the API server's
# RBAC (403), a missing object (404), a bound-object UID mismatch (409), or a bound object
# the API server cannot bind to (400).
VALID_REQUEST_CODES = {
    OK,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}


class FuzzRig:
    def __init__(
        self,
        emulator: Emulator,
        broker: BrokerServer,
        stub: pb_grpc.TokenBrokerServiceStub,
        health: health_pb2_grpc.HealthStub,
    ) -> None:
        self.emulator = emulator
        self.broker = broker
        self.stub = stub
        self.health = health


@pytest.fixture
async def fuzz_rig(
    emulator: Emulator, kubernetes_settings: KubernetesSettings, tmp_path: Path
) -> AsyncIterator[FuzzRig]:
    """One broker (token cache on) for every example; afterwards it still serves: health
    SERVING, a normal call OK, every call handled, no task left behind."""
    async with (
        running_broker(kubernetes_settings, tmp_path, cache={"enabled": True}) as broker,
        caller_stub(broker.address) as stub,
        aio.insecure_channel(broker.address) as health_channel,
    ):
        assert await call(stub) is None
        before = set(asyncio.all_tasks())
        rig = FuzzRig(emulator, broker, stub, health_pb2_grpc.HealthStub(health_channel))
        yield rig
        assert await health(broker.address) == SERVING
        assert await call(stub) is None
        await drained(emulator, broker)
        await no_new_tasks(before)


@settings(FUZZ_SETTINGS, max_examples=150)
@given(req=create_token_requests())
async def test_fuzz_every_request_field(fuzz_rig: FuzzRig, req: pb.CreateTokenRequest) -> None:
    rig = fuzz_rig
    expected = local_verdict(req)
    before = rig.emulator.token_request_count
    status = await call(rig.stub, req)
    code = code_of(status)
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), status
    refused_as_invalid = code == grpc.StatusCode.INVALID_ARGUMENT and (
        reason_of(status) == Reason.REQUEST_INVALID
    )
    # INVALID_ARGUMENT (REQUEST_INVALID) exactly when the broker's own validation refuses.
    assert refused_as_invalid == (expected is not None), (status, expected)
    if expected is not None:
        assert status is not None
        assert status.message == expected.message
        assert status.error_info is not None and status.error_info.domain == ERROR_DOMAIN
        # An invalid request never reaches the API server.
        assert rig.emulator.token_request_count == before
    else:
        assert code in VALID_REQUEST_CODES, status
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            # Only what depends on the cluster's objects, relayed from the API server.
            assert status is not None and status.error_info is not None
            assert status.error_info.domain == KUBERNETES_DOMAIN, status
            assert status.error_info.metadata["kubernetesCode"] == "400", status
            assert status.message.startswith("cannot bind token"), status
    response = await rig.health.Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
    )
    assert response.status == SERVING


async def test_fuzz_oversized_request_is_refused_cleanly(fuzz_rig: FuzzRig) -> None:
    # Twice the broker's 1 MiB message limit: refused by gRPC before any handler runs.
    req = create_request(audiences=["a" * (2 * 1024 * 1024)])
    before = fuzz_rig.emulator.token_request_count
    status = await call(fuzz_rig.stub, req)
    assert code_of(status) == grpc.StatusCode.RESOURCE_EXHAUSTED, status
    assert fuzz_rig.emulator.token_request_count == before


# --- 3. overload ------------------------------------------------------------------------------

OVERLOAD_CALLS = 1000
OVERLOAD_TASKS = 100
PER_CALLER = {"rate": 5, "burst": 10}
GLOBAL = {"rate": 20, "burst": 40}
UPSTREAM_MAX_CONCURRENT = 4
# The whole test process (client, broker, emulator) may grow this much during the burst.
RSS_GROWTH_LIMIT_BYTES = 150 * 1024 * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to ~107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tb-rel-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def test_overload_burst_far_above_the_limits(
    emulator: Emulator,
    kubernetes_settings: KubernetesSettings,
    tmp_path: Path,
    short_dir: Path,
) -> None:
    emulator.faults.latency = 0.05
    socket = short_dir / "broker.sock"
    rate_limit = {
        "perCaller": PER_CALLER,
        "global": GLOBAL,
        "upstream": {"maxConcurrent": UPSTREAM_MAX_CONCURRENT},
    }
    async with running_broker(
        kubernetes_settings, tmp_path, rate_limit=rate_limit, unix_socket=socket
    ) as broker:
        channels = [
            aio.insecure_channel(broker.address, interceptors=[BearerCredential(CALLER_KEY)])
            for _ in range(4)
        ]
        try:
            for channel in channels:
                await asyncio.wait_for(channel.channel_ready(), 10)
            stubs = [pb_grpc.TokenBrokerServiceStub(channel) for channel in channels]
            before_tasks = set(asyncio.all_tasks())
            outcomes: list[RichStatus | None] = []

            async def caller(n: int) -> None:
                stub = stubs[n % len(stubs)]
                for _ in range(OVERLOAD_CALLS // OVERLOAD_TASKS):
                    outcomes.append(await call(stub, timeout=30))

            rss_before = rss_bytes()
            started = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(caller(n) for n in range(OVERLOAD_TASKS))), 120)
            elapsed = time.monotonic() - started
            rss_growth = rss_bytes() - rss_before
        finally:
            for channel in channels:
                await channel.close()

        codes = Counter(code_of(o) for o in outcomes)
        assert sum(codes.values()) == OVERLOAD_CALLS
        assert set(codes) <= {OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
        assert codes[OK] >= 1 and codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 1, codes
        for status in outcomes:
            if code_of(status) == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert reason_of(status) == Reason.RATE_LIMITED, status
            elif code_of(status) == grpc.StatusCode.UNAVAILABLE:
                assert reason_of(status) == Reason.UPSTREAM_BUSY, status
        # One caller: at most its burst plus its rate over the run got through (GCRA; the
        # global limit is larger), each with exactly one request to the API server.
        assert codes[OK] <= PER_CALLER["burst"] + PER_CALLER["rate"] * elapsed + 1, codes
        assert emulator.token_request_count == codes[OK]
        assert 1 <= emulator.in_flight_max <= UPSTREAM_MAX_CONCURRENT
        assert rss_growth < RSS_GROWTH_LIMIT_BYTES, f"RSS grew {rss_growth / 2**20:.1f} MiB"

        # Right after: nothing hangs or leaks, and another caller is served at once (its own
        # bucket; the global limit kept headroom, since one caller can only use its own).
        await drained(emulator, broker)
        assert await health(broker.address) == SERVING
        async with aio.insecure_channel(f"unix:{socket}") as local:
            assert await call(pb_grpc.TokenBrokerServiceStub(local)) is None
        await drained(emulator, broker)
        await no_new_tasks(before_tasks)


# --- 4. SIGTERM during load -------------------------------------------------------------------

SHUTDOWN_GRACE_SECONDS = 10
IN_FLIGHT_AT_SIGTERM = 6


async def wait_until_refused(host: str, port: int) -> None:
    """Until nothing listens on host:port any more (bounded)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except OSError:
            return
        writer.close()
        assert time.monotonic() < deadline, f"{host}:{port} still accepts connections"
        await asyncio.sleep(0.02)


async def test_sigterm_during_load_finishes_calls_refuses_new_ones_and_exits_0(
    emulator: Emulator, kubeconfig: Path, tmp_path: Path
) -> None:
    emulator.faults.latency = 0.5  # the calls are at the API server when the signal comes
    config = serve_config(
        tmp_path / "config.yaml",
        kubeconfig,
        server={"shutdownGraceSeconds": SHUTDOWN_GRACE_SECONDS},
        cache={"enabled": False},
        rateLimit={"enabled": False},
        log={"format": "json", "level": "debug"},
    )
    process = await start_broker("serve", "--config", str(config))
    EXPECTED_SOURCES.update({"child", "metrics"})
    try:
        ready = json.loads(
            process.stderr[await process.wait_for("token broker serving", stream="stderr")]
        )
        address = ready["listen"]
        capture("metrics", await scrape_metrics(f"http://{ready['admin_listen']}"))
        async with aio.insecure_channel(
            address, interceptors=[BearerCredential(CALLER_KEY)]
        ) as channel:
            stub = pb_grpc.TokenBrokerServiceStub(channel)
            calls = [
                asyncio.ensure_future(call(stub, timeout=30)) for _ in range(IN_FLIGHT_AT_SIGTERM)
            ]
            await wait_until(
                lambda: emulator.in_flight == IN_FLIGHT_AT_SIGTERM or any(c.done() for c in calls),
                30,
                "every call at the API server",
            )
            assert not any(c.done() for c in calls), [c.result() for c in calls if c.done()]

            process.proc.send_signal(signal.SIGTERM)
            await process.wait_for("shutting down", stream="stderr")
            # Once the listener is closed, new calls are refused (UNAVAILABLE): on a new
            # connection, and on the open one once the client has seen its GOAWAY.
            host, port = address.rsplit(":", 1)
            await wait_until_refused(host, int(port))
            async with caller_stub(address, own_connection=True) as new_stub:
                status = await call(new_stub, timeout=10)
                assert code_of(status) == grpc.StatusCode.UNAVAILABLE, status
            await asyncio.wait_for(
                channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10
            )
            status = await call(stub, timeout=10)
            assert code_of(status) == grpc.StatusCode.UNAVAILABLE, status
            # The calls in flight complete normally.
            results = await asyncio.wait_for(asyncio.gather(*calls), 30)
            assert results == [None] * IN_FLIGHT_AT_SIGTERM, results
        # Exit 0 within the grace period (this bound is the only timing in the test).
        rc = await asyncio.wait_for(process.proc.wait(), SHUTDOWN_GRACE_SECONDS)
        assert rc == 0, "".join(process.stderr)
        await asyncio.wait_for(asyncio.gather(*process._readers), 10)
        messages = [
            json.loads(line).get("message") for line in process.stderr if line.startswith("{")
        ]
        assert "received SIGTERM" in messages
        assert "stopped" in messages
        assert emulator.token_request_count == IN_FLIGHT_AT_SIGTERM
    finally:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()
        capture("child:stdout", "".join(process.stdout))
        capture("child:stderr", "".join(process.stderr))


# --- 5. secrets: last in the module ------------------------------------------------------------


@pytest.mark.last_in_module
def test_no_token_or_credential_in_anything_captured() -> None:
    """Runs last in the module (conftest.py orders it): scans what every other test of the
    module captured."""
    if not ISSUED:
        pytest.skip("scans what the module's other tests captured: run it with them")
    sources = {source.split(":")[0] for source, _ in CAPTURED}
    # The scan is only as good as what it covers.
    assert sources >= EXPECTED_SOURCES, sources
    secrets = {
        CALLER_KEY: "the caller's API key",
        BROKER_TOKEN: "the broker's Kubernetes credential",
    }
    for token in ISSUED:
        secrets[token] = "an issued token"
        secrets[token.rsplit(".", 1)[-1]] = "an issued token's signature"
    haystack = "\n".join(text for _, text in CAPTURED)
    found = [secret for secret in secrets if secret in haystack]
    leaks = sorted(
        {
            (secrets[secret], source)
            for secret in found
            for source, text in CAPTURED
            if secret in text
        }
    )
    assert not leaks, leaks
