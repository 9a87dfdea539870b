"""The hot path's shortcuts write exactly what the long way writes.

Each fast path of the request path has a slow twin it must never differ from: an audit line
from its template and the record's own `to_json()`; an access line written straight to the
broker's JSON handler and the same line through logging (and logging is used whenever anything
could change the line); the per-call metrics kept as plain numbers and prometheus_client's
Counter and Histogram; the TokenRequest body written as plain JSON and the client library's
models of it; the API server's answer read field by field and json_format's ParseDict; the
request id and timestamps formatted by hand and by uuid/datetime. And the pieces the fast path
is built of: lines to a pipe, in order, never blocking; the decision memo, bounded, exactly
invalidated, holding no credential.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import random
import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.aio import client as kclient
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker import audit, logs, observe
from broker.audit import AuditLog, AuditRecord, AuditTemplate, rfc3339_micro, rfc3339_micro_at
from broker.config import LogSettings
from broker.convert import (
    TOKEN_REQUEST_API_VERSION,
    TOKEN_REQUEST_KIND,
    token_request_body,
    token_request_from_json,
)
from broker.credentials import Credentials
from broker.decision_memo import Decided, DecisionMemo
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import Identity
from broker.logs import BackgroundLineWriter, iso_millis_at, setup_logging
from broker.metrics import LoopCounter, LoopHistogram
from broker.pipes import PIPE_BUF, nonblocking_pipe, write_lines
from broker.policy import Policy
from broker.request_id import new_request_id
from tests.support.stack import CALLER_KEY, create_request

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VISIBLE_ASCII = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128
)
ANY_TEXT = st.text(max_size=40) | st.text(max_size=400)
TIMESTAMPS = st.floats(min_value=0, max_value=4e9, allow_nan=False)


# --- audit lines: template and record ---------------------------------------------------------


records = st.builds(
    AuditRecord,
    request_id=st.just("placeholder"),
    user=st.none() | ANY_TEXT,
    auth_method=st.none() | st.sampled_from(["mtls", "apiKey", "jwt", "unixSocket"]),
    issuer=st.none() | ANY_TEXT,
    peer=st.none() | ANY_TEXT,
    namespace=ANY_TEXT,
    service_account=ANY_TEXT,
    audiences=st.none() | st.lists(ANY_TEXT, max_size=40).map(tuple),
    granted_audiences=st.lists(ANY_TEXT, max_size=3).map(tuple),
    requested_expiration_seconds=st.none() | st.integers(0, 1 << 40),
    granted_expiration_seconds=st.none() | st.integers(0, 1 << 40),
    bound_object_ref=st.none(),
    dry_run=st.none() | st.booleans(),
    decision=st.sampled_from(["allowed", "denied", "error"]),
    rule=st.none() | ANY_TEXT,
    reason=ANY_TEXT,
    code=st.sampled_from(["OK", "PERMISSION_DENIED"]),
    upstream_status=st.none() | st.integers(100, 599),
    latency_ms=st.just(0.0),
    jti=st.none() | ANY_TEXT,
    token_sha256=st.none() | st.text("0123456789abcdef", min_size=16, max_size=16),
    token_lifetime_seconds=st.none() | st.integers(0, 1 << 40),
    time=st.just(datetime.now(UTC)),
    certificate_field=st.none() | st.sampled_from(["uri", "dns", "cn"]),
    suppressed_refusals=st.none() | st.integers(0, 100),
)


@EXAMPLES
@given(
    record=records,
    request_id=VISIBLE_ASCII,
    peer=st.none() | ANY_TEXT,
    latency=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    now=TIMESTAMPS,
)
def test_an_audit_template_writes_the_records_own_line(
    record: AuditRecord, request_id: str, peer: str | None, latency: float, now: float
) -> None:
    template = AuditTemplate.of(record)
    if template is None:
        return  # a value holding a mark, or a line near the bound: to_json() then
    line = template.line(request_id=request_id, peer=peer, latency_ms=latency, now=now)
    filled = dataclasses.replace(
        record,
        request_id=request_id,
        peer=peer,
        latency_ms=latency,
        time=datetime.fromtimestamp(now, UTC),
    )
    expected = filled.to_json()
    if line is None:
        assert len(expected.encode()) > 0  # too long for a template: the record's bounds
        return
    assert line == expected


def test_a_template_is_made_for_an_ordinary_hit() -> None:
    record = AuditRecord.for_call(
        create_request(audiences=["https://vault.example.com"]),
        request_id="x",
        identity=Identity(method="apiKey", name="ci"),
        peer="ipv4:127.0.0.1:1",
        latency_ms=1.0,
        rule="core-tests",
        cache_hit=True,
    )
    template = AuditTemplate.of(record)
    assert template is not None
    line = template.line(request_id="r-1", peer="ipv4:10.0.0.1:2", latency_ms=1.25, now=0.5)
    assert line is not None
    entry = json.loads(line)
    assert (entry["requestID"], entry["peer"], entry["latencyMs"]) == (
        "r-1",
        "ipv4:10.0.0.1:2",
        1.25,
    )
    assert entry["time"] == "1970-01-01T00:00:00.500000Z"


@EXAMPLES
@given(now=TIMESTAMPS)
def test_timestamps_are_formatted_as_datetime_formats_them(now: float) -> None:
    when = datetime.fromtimestamp(now, UTC)
    assert rfc3339_micro_at(now) == rfc3339_micro(when)
    assert iso_millis_at(now) == when.isoformat(timespec="milliseconds")


def test_request_ids_are_uuid4_strings() -> None:
    for _ in range(1000):
        text = new_request_id()
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


# --- access lines: straight to the handler, or through logging -------------------------------


def _access_line(monkeypatch: pytest.MonkeyPatch, fields: dict[str, str], request_id: str) -> None:
    monkeypatch.setattr("time.time", lambda: 1_700_000_000.123456)
    observe.log_access(
        logging.INFO,
        "tokenbroker.v1.TokenBrokerService",
        "CreateToken",
        observe.grpc.StatusCode.OK,
        0.0012345,
        request_id,
        fields,
    )


@pytest.mark.parametrize(
    "fields, request_id",
    [
        ({"namespace": "demo", "service_account": "robot", "user": "ci", "cache": "hit"}, "r-1"),
        ({"user": "Bearer abc.def", "namespace": "d\u2028e\x1b"}, "eyJhbGciOi.eyJzdWIiOi.c2ln"),
        ({"user": "\x00request_id\x00", "reason": 'QUOTE"D'}, 'id"with\\quotes'),
        ({}, "r-2"),
    ],
)
def test_the_direct_access_line_is_the_logging_line(
    restore_logging: None,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, str],
    request_id: str,
) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(format="json", level="info"), stream)
    assert logs.direct_json_handler(observe.access_logger, logging.INFO) is not None
    _access_line(monkeypatch, fields, request_id)
    _access_line(monkeypatch, fields, request_id)  # from the template, once made
    with monkeypatch.context() as patched:
        patched.setattr(observe, "direct_json_handler", lambda *_: None)  # the long way
        _access_line(patched, fields, request_id)
    direct, templated, through_logging = stream.getvalue().splitlines()
    assert direct == templated == through_logging
    assert CALLER_KEY not in direct and "eyJzdWIiOi" not in direct


def test_logging_is_used_when_it_could_change_the_line(restore_logging: None) -> None:
    stream = io.StringIO()
    setup_logging(LogSettings(format="json", level="info"), stream)
    logger = observe.access_logger
    assert logs.direct_json_handler(logger, logging.INFO) is not None
    assert logs.direct_json_handler(logger, logging.DEBUG) is None  # level off
    extra = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(extra)  # pytest's caplog does this
    try:
        assert logs.direct_json_handler(logger, logging.INFO) is None
    finally:
        logging.getLogger().removeHandler(extra)
    logger.addFilter(logging.Filter("x"))
    try:
        assert logs.direct_json_handler(logger, logging.INFO) is None
    finally:
        logger.filters.clear()
    logging.getLogger("broker").propagate = False
    try:
        assert logs.direct_json_handler(logger, logging.INFO) is None
    finally:
        logging.getLogger("broker").propagate = True
    setup_logging(LogSettings(format="text", level="info"), io.StringIO())
    assert logs.direct_json_handler(logger, logging.INFO) is None


# --- metrics: plain numbers, the same exposition -----------------------------------------------


def test_loop_counters_and_histograms_expose_what_prometheus_client_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    buckets = (0.005, 0.01, 0.1, 1.0, 30.0)
    counter = LoopCounter("calls", "Calls.", ("code", "method"), registry=ours)
    reference = Counter("calls", "Calls.", ("code", "method"), registry=theirs)
    histogram = LoopHistogram("seconds", "Seconds.", ("method",), buckets=buckets, registry=ours)
    reference_h = Histogram("seconds", "Seconds.", ("method",), buckets=buckets, registry=theirs)
    plain = LoopHistogram("plain", "Plain.", buckets=(600, 3600), registry=ours)
    reference_p = Histogram("plain", "Plain.", buckets=(600, 3600), registry=theirs)
    rng = random.Random(7)
    counter.labels("OK", "a")
    reference.labels("OK", "a")
    for _ in range(500):
        code, method = rng.choice(["OK", "DENIED"]), rng.choice(["a", "b"])
        counter.labels(code, method).inc()
        reference.labels(code, method).inc()
        value = rng.choice([0.0, 0.005, 0.0051, 0.5, 1.0, 99.0, rng.random()])
        histogram.labels(method).observe(value)
        reference_h.labels(method).observe(value)
        plain.observe(value * 10_000)
        reference_p.observe(value * 10_000)
    assert generate_latest(ours) == generate_latest(theirs)


# --- the upstream call: the body written and the answer read by hand ---------------------------


def _library_body(token_request: pb.TokenRequest) -> Any:
    spec = token_request.spec
    bound = None
    if spec.HasField("bound_object_ref"):
        ref = spec.bound_object_ref
        bound = kclient.V1BoundObjectReference(
            kind=ref.kind or None,
            api_version=ref.api_version or None,
            name=ref.name or None,
            uid=ref.uid or None,
        )
    return kclient.AuthenticationV1TokenRequest(
        api_version=TOKEN_REQUEST_API_VERSION,
        kind=TOKEN_REQUEST_KIND,
        metadata=kclient.V1ObjectMeta(
            name=token_request.metadata.name or None,
            namespace=token_request.metadata.namespace or None,
        ),
        spec=kclient.V1TokenRequestSpec(
            audiences=list(spec.audiences),
            expiration_seconds=(
                spec.expiration_seconds if spec.HasField("expiration_seconds") else None
            ),
            bound_object_ref=bound,
        ),
    )


@EXAMPLES
@given(
    name=st.sampled_from(["", "robot"]),
    namespace=st.sampled_from(["", "demo"]),
    audiences=st.lists(st.text(min_size=1, max_size=20), max_size=3),
    expiration=st.none() | st.integers(600, 1 << 32),
    bound=st.none() | st.tuples(*(st.sampled_from(["", "Pod", "v1", "web-0", "u-1"]),) * 4),
)
def test_the_request_body_is_what_the_client_librarys_models_send(
    name: str,
    namespace: str,
    audiences: list[str],
    expiration: int | None,
    bound: tuple[str, str, str, str] | None,
) -> None:
    token_request = pb.TokenRequest(
        metadata=pb.ObjectMeta(name=name, namespace=namespace),
        spec=pb.TokenRequestSpec(audiences=audiences),
    )
    if expiration is not None:
        token_request.spec.expiration_seconds = expiration
    if bound is not None:
        kind, api_version, ref_name, uid = bound
        token_request.spec.bound_object_ref.CopyFrom(
            pb.BoundObjectReference(kind=kind, api_version=api_version, name=ref_name, uid=uid)
        )
    api = kclient.ApiClient()
    ours = json.dumps(api.sanitize_for_serialization(token_request_body(token_request)))
    theirs = json.dumps(api.sanitize_for_serialization(_library_body(token_request)))
    assert ours == theirs


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 64), 1 << 64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "2024-05-01T12:00:00Z", "2024-05-01T12:00:00.5+02:00", "3600"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = {
    "metadata": ["name", "namespace", "uid", "creationTimestamp", "creation_timestamp", "labels"],
    "spec": ["audiences", "expirationSeconds", "expiration_seconds", "boundObjectRef", "x"],
    "status": ["token", "expirationTimestamp", "expiration_timestamp", "y"],
}
REF_FIELDS = ["kind", "apiVersion", "api_version", "name", "uid", "z"]


@st.composite
def answers(draw: st.DrawFn) -> dict[str, Any]:
    """TokenRequest-shaped JSON: mostly the right types, sometimes anything."""
    good = {
        "name": st.text(max_size=8),
        "namespace": st.text(max_size=8),
        "uid": st.text(max_size=8),
        "token": st.text(min_size=1, max_size=8),
        "creationTimestamp": st.sampled_from(["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.25Z"]),
        "expirationTimestamp": st.sampled_from(
            ["2024-05-01T13:00:00Z", "2024-05-01T13:00:00+01:00"]
        ),
        "audiences": st.lists(st.text(max_size=8), max_size=3),
        "expirationSeconds": st.integers(0, 1 << 40),
        "boundObjectRef": st.dictionaries(
            st.sampled_from(REF_FIELDS), st.text(max_size=5) | JSON_VALUES, max_size=4
        ),
    }
    body: dict[str, Any] = {}
    for message, names in FIELDS.items():
        if draw(st.booleans()):
            body[message] = {
                name: draw(good[name] if name in good and draw(st.integers(0, 4)) else JSON_VALUES)
                for name in draw(st.lists(st.sampled_from(names), unique=True))
            }
    if draw(st.booleans()):
        body[draw(st.sampled_from(["kind2", "metadata", "status"]))] = draw(JSON_VALUES)
    return body


@settings(EXAMPLES, max_examples=1000)
@given(body=answers())
def test_the_answer_is_read_as_json_format_reads_it(body: dict[str, Any]) -> None:
    expected: pb.TokenRequest | None = pb.TokenRequest()
    try:
        json_format.ParseDict(body, expected, ignore_unknown_fields=True)
    except Exception:
        expected = None
    raw = json.dumps({"kind": "TokenRequest", **body}).encode()
    try:
        got: pb.TokenRequest | None = token_request_from_json(raw)
    except ValueError:
        got = None
    if expected is None or not expected.status.token:
        assert got is None
    else:
        assert got is not None
        assert got.SerializeToString(deterministic=True) == expected.SerializeToString(
            deterministic=True
        )


def test_the_api_servers_usual_answer_takes_the_short_way() -> None:
    answer = {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": "robot", "namespace": "demo", "creationTimestamp": None},
        "spec": {"audiences": ["a"], "expirationSeconds": 3600, "boundObjectRef": None},
        "status": {"token": "t", "expirationTimestamp": "2024-05-01T13:00:00Z"},
    }
    body = {k: v for k, v in answer.items() if k not in ("kind", "apiVersion")}
    from broker.convert import _read_token_request

    assert _read_token_request(body) is not None


# --- lines to a pipe -----------------------------------------------------------------------------


def test_a_pipe_takes_whole_lines_or_nothing(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    try:
        direct = nonblocking_pipe(write_fd)
        assert direct is not None
        lines = [f"line {i:05d}\n".encode() for i in range(20_000)]  # more than the pipe holds
        written = write_lines(direct, lines)
        assert 0 < written < len(lines)
        os.set_blocking(read_fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(read_fd, 1 << 16)
            except BlockingIOError:
                break
            data += chunk
        assert data == b"".join(lines[:written])
        assert write_lines(direct, [b"x" * (PIPE_BUF + 1)]) == 0  # never atomic: not here
        os.close(direct)
    finally:
        os.close(read_fd)
        os.close(write_fd)
    regular = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT)
    try:
        assert nonblocking_pipe(regular) is None  # a file may hang: the thread writes it
    finally:
        os.close(regular)


async def test_audit_lines_to_a_pipe_keep_their_order_when_it_fills(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    import fcntl

    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    log = AuditLog(io.StringIO())
    # The stdout sink, on this pipe: straight writes while it has room, the thread after.
    log._sink = audit._FdSink(write_fd, "<pipe>", direct=nonblocking_pipe(write_fd))
    received = bytearray()
    os.set_blocking(read_fd, False)

    def drain() -> None:
        try:
            while chunk := os.read(read_fd, 1 << 16):
                received.extend(chunk)
        except BlockingIOError:
            pass

    loop = asyncio.get_running_loop()
    try:
        writes = [log.write(dataclasses.replace(_record(), request_id=f"p-{i}")) for i in range(40)]
        waiting = asyncio.gather(*writes)
        await asyncio.sleep(0.05)  # the pipe is full; the rest wait in the thread
        loop.add_reader(read_fd, drain)
        await asyncio.wait_for(waiting, 30)
        while log.pending_lines:
            await asyncio.sleep(0.01)
        drain()
        loop.remove_reader(read_fd)
        ids = [json.loads(line)["requestID"] for line in received.decode().splitlines()]
        assert ids == [f"p-{i}" for i in range(40)]
        assert log.written_lines == 40 and log.lost_lines == 0
    finally:
        await log.close()
        os.close(read_fd)
        os.close(write_fd)


def _record() -> AuditRecord:
    return AuditRecord.for_call(
        create_request(namespace="n" * 200),
        request_id="x",
        identity=None,
        peer=None,
        latency_ms=1.0,
    )


async def test_log_lines_to_a_pipe_keep_their_order(tmp_path: Path) -> None:
    read_fd, write_fd = os.pipe()
    import fcntl

    fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
    stream = os.fdopen(write_fd, "w", buffering=1, closefd=False)
    writer = BackgroundLineWriter(
        stream, dropped_notice=lambda n: f"{n} dropped\n", direct=nonblocking_pipe(write_fd)
    )
    received = bytearray()
    done = threading.Event()

    def reader() -> None:
        while chunk := os.read(read_fd, 1 << 16):
            received.extend(chunk)
        done.set()

    try:
        lines = [f"{i:04d} {'x' * 100}\n" for i in range(400)]
        for i, line in enumerate(lines):
            writer.write(line)
            writer.flush()
            if i % 50 == 0:
                await asyncio.sleep(0)  # a pass of the loop ends: its lines are written
        threading.Thread(target=reader, daemon=True).start()
        await asyncio.sleep(0)
        writer.stop()
        stream.close()
        os.close(write_fd)
        write_fd = -1
        assert done.wait(30)
        assert received.decode() == "".join(lines)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)


# --- the decision memo ---------------------------------------------------------------------------


class _Source:
    def __init__(self) -> None:
        self.current = Policy.from_dict({"rules": []})


def _decided(memo: DecisionMemo, identity: Identity, raw: bytes) -> Decided:
    decided = Decided(policy=memo.policy(), identity=identity, request=create_request())
    memo.put(raw, decided)
    return decided


def test_the_memo_is_bounded_least_recently_used_first() -> None:
    memo = DecisionMemo(_Source(), max_entries=2)
    who = Identity(method="apiKey", name="ci")
    _decided(memo, who, b"a")
    _decided(memo, who, b"b")
    assert memo.get(who, b"a") is not None  # a is now the most recent
    _decided(memo, who, b"c")
    assert len(memo) == 2 and memo.stats.evictions == 1
    assert memo.get(who, b"b") is None
    assert memo.get(who, b"a") is not None and memo.get(who, b"c") is not None


def test_the_memo_forgets_everything_when_another_policy_is_in_force() -> None:
    source = _Source()
    memo = DecisionMemo(source)
    who = Identity(method="apiKey", name="ci")
    _decided(memo, who, b"a")
    assert memo.get(who, b"a") is not None
    source.current = Policy.from_dict({"rules": []})  # reloaded: another object
    assert memo.get(who, b"a") is None
    memo.policy()
    assert len(memo) == 0 and memo.stats.invalidations == 1


def test_identities_differ_in_the_memo_when_anything_about_them_differs() -> None:
    def jwt(**claims: Any) -> Identity:
        return Identity(method="jwt", name="a", issuer="i", claims=MappingProxyType(claims))

    keys = {
        jwt(x=1).memo_key,
        jwt(x=1.0).memo_key,
        jwt(x=True).memo_key,
        jwt(x="1").memo_key,
        jwt(x=[1]).memo_key,
        jwt().memo_key,
        Identity(method="apiKey", name="a").memo_key,
        Identity(method="mtls", name="a").memo_key,
        Identity(method="mtls", name="a", certificate_field="dns").memo_key,
    }
    assert len(keys) == 9
    assert jwt(x=1, y=2).memo_key == jwt(y=2, x=1).memo_key


def test_credentials_never_show_the_bearer() -> None:
    credentials = Credentials(authorization=(f"Bearer {CALLER_KEY}",), peer="ipv4:1.2.3.4:5")
    assert CALLER_KEY not in repr(credentials) and CALLER_KEY not in str(credentials)
