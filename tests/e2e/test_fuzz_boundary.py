"""Fuzzing the broker's boundary with what an unauthenticated or hostile caller controls (issue 14,
item 5): raw request bytes, raw metadata values (bearers of any shape and size), and the names
in client certificates. test_reliability.py fuzzes valid messages; these do not.

Each property runs against a broker in dev mode and a configured broker with every
authentication method on (tests/support/fuzz.py builds both), through the real stack: a gRPC
client sending raw bytes, the broker, kubernetes.aio, the API-server emulator. For every
example (`Target.check`): never UNKNOWN or INTERNAL; its audit line written and every line
under MAX_AUDIT_LINE_BYTES; nothing of the example's secret material (a unique marker in each
generated credential, or the credential itself) in any log record, audit line, answer or
/metrics; no TokenRequest for a call refused as unauthenticated or not a request. And a token
only when the policy allows it, decided here from the drawn input (the README's rules), not by
the broker's own code:

- raw bytes: unauthenticated callers get UNAUTHENTICATED whatever the bytes; authenticated
  ones REQUEST_MALFORMED exactly when protobuf does not parse the bytes, and a token only for
  a namespace, service account and audiences the policy allows anyone;
- metadata: a token exactly when the one `authorization` value is `Bearer <the API key>` (any
  case, spaces around) or a JWT that verifies, or when there is none and the connection itself
  identifies an allowed caller (a client certificate, the unix socket); a bad bearer never
  falls back to the certificate;
- certificate names: a token exactly when a rule matches the name the README says the broker
  derives (SPIFFE ID rules, one field per subject, several URI SANs matching no uri subject),
  that rule deciding (the audit line's `rule`, `user` and `certificateField`).

The gRPC client library refuses some metadata before sending it (non-printable or non-ASCII
values, uppercase or malformed keys, text under a `-bin` key), and gRPC's server refuses
metadata beyond its limits (8 KiB, then 16 KiB) with RESOURCE_EXHAUSTED before the broker
sees the call: test_what_grpc_refuses_before_the_broker pins both, and the properties draw
metadata the client sends, of any size around those limits.

What the fuzzing found: a client certificate whose CN is longer than 64 characters made
cryptography write a warning to stderr, outside the broker's log lines (now a log record:
test_a_certificate_that_makes_a_library_warn_is_logged_as_one_line).
"""

from __future__ import annotations

import io
import json
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf.internal.decoder import _DecodeVarint as decode_varint
from google.protobuf.internal.encoder import _VarintBytes as varint
from grpc import aio
from hypothesis import event, given, settings
from hypothesis import strategies as st

from broker.authn import certificate_identity
from broker.config import KubernetesSettings, LogSettings
from broker.emulator import Emulator
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.logs import setup_logging
from broker.reasons import Reason
from broker.server import MAX_RECEIVE_MESSAGE_BYTES
from tests.support.certs import client_cert
from tests.support.cli import Pki, issue
from tests.support.fuzz import (
    FUZZ_SETTINGS,
    JWT_CALLER,
    OK,
    Route,
    Target,
    call_raw,
    configured_target,
    dev_target,
    marker,
    mtls_channel,
)
from tests.support.jwt_issuer import AUDIENCE, ISSUER, b64

# cryptography warns about the CNs longer than 64 characters these tests draw (it reads them).
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length must be:UserWarning")

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
# A request that parses may still be refused: validation, the policy, the API server.
PARSED_REQUEST_CODES = {
    OK,
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
# gRPC's server refuses metadata over 8 KiB at random, over 16 KiB always (HPACK sizes: each
# entry counts 32 bytes more); with the call's own headers, a margin below the soft limit.
METADATA_SOFT_LIMIT = 8 * 1024
METADATA_MARGIN = 1024


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The server certificate and the client CA (one trustme CA signs both)."""
    return issue(tmp_path, "pki", "localhost", "127.0.0.1")


@pytest.fixture(params=["dev", "configured"])
async def target(
    request: pytest.FixtureRequest,
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    tmp_path: Path,
    pki: Pki,
) -> AsyncIterator[Target]:
    if request.param == "dev":
        async with dev_target(tmp_path) as dev:
            yield dev
    else:
        async with configured_target(kubernetes_settings, emulator, tmp_path, pki) as configured:
            yield configured


# --- 1. raw request bytes ------------------------------------------------------------------------


def tag_offsets(data: bytes, base: int = 0) -> list[int]:
    """Where the field tags of a well-formed message are, nested messages included (any
    length-delimited field whose content walks as a message)."""
    offsets: list[int] = []
    i = 0
    try:
        while i < len(data):
            start = i
            tag, i = decode_varint(data, i)
            wire_type = tag & 7
            if wire_type == 0:
                _, i = decode_varint(data, i)
            elif wire_type == 2:
                length, i = decode_varint(data, i)
                if i + length > len(data):
                    return []
                offsets += tag_offsets(data[i : i + length], base + i)
                i += length
            else:
                return []
            offsets.append(base + start)
    except Exception:  # not a message after all
        return []
    return offsets


def message_of_size(size: int) -> bytes:
    """A CreateTokenRequest of exactly `size` bytes: field_manager (5) filled with `m`."""
    for header in (2, 3, 4, 5):
        body = size - header
        if len(b"\x2a" + varint(body)) == header:
            return b"\x2a" + varint(body) + b"m" * body
    raise ValueError(size)


def flip_bits(data: bytes, bits: list[int]) -> bytes:
    out = bytearray(data)
    for bit in bits:
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def with_wire_type(data: bytes, offset: int, wire_type: int) -> bytes:
    out = bytearray(data)
    out[offset] = (out[offset] & ~7) | wire_type
    return bytes(out)


def request_bodies(valid: bytes) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and the valid request broken every way a hostile client would."""
    n = len(valid)
    tags = tag_offsets(valid)
    assert tags, "the valid request does not walk as a message"
    return st.one_of(
        st.binary(max_size=600),
        st.integers(0, n - 1).map(lambda i: valid[:i]),  # truncated
        st.lists(st.integers(0, n * 8 - 1), min_size=1, max_size=8).map(
            lambda bits: flip_bits(valid, bits)
        ),
        st.binary(min_size=1, max_size=200).map(lambda garbage: valid + garbage),
        st.tuples(st.sampled_from(tags), st.integers(0, 7)).map(
            lambda t: with_wire_type(valid, *t)
        ),
        # An unknown field (proto3 keeps and ignores it): still the valid request.
        st.tuples(st.integers(16, 2**29 - 1), st.binary(max_size=40)).map(
            lambda t: valid + varint(t[0] << 3 | 2) + varint(len(t[1])) + t[1]
        ),
        # Unknown groups nested deeper than any parser's recursion limit.
        st.integers(1, 50_000).map(lambda depth: valid + b"\x7b" * depth + b"\x7c" * depth),
        # Lengths and varints that lie.
        st.sampled_from(
            [
                b"\x0a" + varint(2**31) + b"demo",
                b"\x0a" + b"\xff" * 10 + b"\x01",
                b"\x1a" + varint(n) + valid,
                valid[:1] + b"\x80" * 12,
                b"",
            ]
        ),
        # Around the receive limit (1 MiB): a field_manager of any length.
        st.integers(-4, 4).map(lambda d: message_of_size(MAX_RECEIVE_MESSAGE_BYTES + d)),
    )


def parsed(body: bytes) -> pb.CreateTokenRequest | None:
    try:
        return pb.CreateTokenRequest.FromString(body)
    except Exception:  # DecodeError, or what the parser raises on hostile bytes
        return None


@dataclass
class RawCase:
    route: str
    body: bytes


@st.composite
def raw_cases(draw: st.DrawFn, target: Target) -> RawCase:
    route = draw(st.sampled_from(sorted(target.routes)))
    body = draw(request_bodies(target.valid_request.SerializeToString()))
    return RawCase(route, body)


async def check_raw_bytes(target: Target, case: RawCase) -> None:
    route = target.routes[case.route]
    window = target.observe()
    outcome = await call_raw(route, case.body)
    event(f"{route.name}: {outcome.code.name} {outcome.reason}")
    secrets = [target.api_key] + [v.split(" ", 1)[1] for _, v in route.metadata]
    await target.check(window, outcome, secrets)
    over_the_limit = len(case.body) > MAX_RECEIVE_MESSAGE_BYTES
    if over_the_limit and outcome.code == RESOURCE_EXHAUSTED:
        assert not outcome.broker_answered  # gRPC's own refusal
        return
    assert not over_the_limit, outcome.status
    if not route.authenticated:
        # Not even whether the bytes parse: nothing but UNAUTHENTICATED.
        assert outcome.code == UNAUTHENTICATED, outcome.status
        return
    request = parsed(case.body)
    if request is None:
        assert outcome.code == INVALID_ARGUMENT, outcome.status
        assert outcome.reason == Reason.REQUEST_MALFORMED
        return
    assert outcome.code in PARSED_REQUEST_CODES, outcome.status
    assert outcome.reason != Reason.REQUEST_MALFORMED
    if outcome.code == OK:
        target.check_issued(outcome, request)


@settings(FUZZ_SETTINGS, max_examples=120)
@given(data=st.data())
async def test_raw_request_bytes(target: Target, data: st.DataObject) -> None:
    await check_raw_bytes(target, data.draw(raw_cases(target)))


# --- 2. raw metadata: bearers of any shape and size ----------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
# The documented bearer: `Bearer <credential>`, the scheme in any case, spaces around, the
# credential printable with no space inside (the only whitespace the client can send).
BEARER = re.compile(r" *[Bb][Ee][Aa][Rr][Ee][Rr] +([!-~]+) *")
MAX_BEARER_CHARS = 16 * 1024  # the README's bound


@dataclass
class Credential:
    """One `authorization` value, and what it is worth here."""

    value: str
    # "key" (the API key), "jwt" (a JWT that verifies), "other-jwt" (one that verifies, for a
    # subject no rule names), "bad".
    verdict: str
    secrets: list[str]


def verdict_of(value: str, api_key: str) -> str:
    match = BEARER.fullmatch(value)
    if match is None or len(match.group(1)) > MAX_BEARER_CHARS:
        return "bad"
    return "key" if match.group(1) == api_key else "bad"


def insert(text: str, secret: str, position: int) -> str:
    position = min(position, len(text))
    return text[:position] + secret + text[position:]


@st.composite
def printable_values(draw: st.DrawFn, api_key: str) -> Credential:
    """Any printable text, `Bearer`-like or not, with a marker somewhere in it."""
    secret = marker()
    scheme = draw(
        st.sampled_from(["", "Bearer ", "bearer ", "BEARER  ", " Bearer ", "Basic ", "Token "])
    )
    text = draw(st.text(PRINTABLE, max_size=300))
    value = scheme + insert(text, secret, draw(st.integers(0, 300)))
    return Credential(value, verdict_of(value, api_key), [secret])


@st.composite
def huge_values(draw: st.DrawFn, api_key: str) -> Credential:
    """Around and beyond gRPC's metadata limits and the broker's own bearer bound."""
    secrets = [marker(), marker(), marker()]
    size = draw(st.sampled_from([4000, 7000, 8200, 12000, 16 * 1024, 16 * 1024 + 100, 40000]))
    filler = draw(st.sampled_from(["a", "A9_-", " x"]))
    body = (filler * (size // len(filler) + 1))[:size]
    middle = len(body) // 2
    value = "Bearer " + secrets[0] + body[:middle] + secrets[1] + body[middle:] + secrets[2]
    return Credential(value, verdict_of(value, api_key), secrets)


@st.composite
def key_variations(draw: st.DrawFn, api_key: str) -> Credential:
    """The real key, as the README allows it to be written, or broken by one character."""
    scheme = draw(st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]))
    key = api_key
    how = draw(st.sampled_from(["as is", "changed", "dropped", "added", "space inside"]))
    at = draw(st.integers(0, len(key) - 1))
    if how == "changed":
        key = key[:at] + ("x" if key[at] != "x" else "y") + key[at + 1 :]
    elif how == "dropped":
        key = key[:at] + key[at + 1 :]
    elif how == "added":
        key = key[:at] + draw(PRINTABLE.filter(lambda c: c != " ")) + key[at:]
    elif how == "space inside":
        key = key[: at + 1] + " " + key[at + 1 :]
    before, between, after = (draw(st.text(" ", max_size=3)) for _ in range(3))
    value = f"{before}{scheme} {between}{key}{after}"
    return Credential(value, verdict_of(value, api_key), [api_key])


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def unsigned_jwts(draw: st.DrawFn) -> Credential:
    """JWT-shaped: three base64url segments, a header with `alg`, hostile JSON anywhere;
    the signature (a marker in it) is never valid."""
    secret = marker()
    header = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
    header["alg"] = draw(st.sampled_from(["RS256", "none", "HS256", "ES256"]) | JSON_VALUES)
    if draw(st.booleans()):
        header["kid"] = draw(st.sampled_from(["hardening-rsa-1", "nope"]) | JSON_VALUES)
    payload = draw(
        st.one_of(
            JSON_VALUES,
            st.fixed_dictionaries(
                {"iss": st.just(ISSUER), "sub": st.just(JWT_CALLER)},
                optional={"aud": JSON_VALUES, "exp": JSON_VALUES, "deep": st.just(nested(40))},
            ),
        )
    )
    signature = b64(draw(st.binary(max_size=64))) + secret
    value = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{signature}"
    return Credential(f"Bearer {value}", "bad", [secret])


REGISTERED = ("iss", "aud", "exp", "iat", "nbf", "sub")


@st.composite
def signed_jwts(draw: st.DrawFn, target: Target) -> Credential:
    """Tokens the issuer's key really signed: every registered claim good but at most one (bad
    or absent: the README's checks: iss, aud, exp and iat required, NumericDates sane, the
    identity claim a non-empty string), hostile extra claims."""
    assert target.signer is not None
    now = int(time.time())
    # None: the claim is absent.
    good: dict[str, list[Any]] = {
        "iss": [ISSUER],
        "aud": [AUDIENCE, [AUDIENCE], ["nope", "other"]],  # the issuer's: [AUDIENCE, "other"]
        "exp": [now + 300, now + 300.5],
        "iat": [now, now - 100],
        "nbf": [None, now - 10],
        "kid": [target.signer.kid],
    }
    bad: dict[str, list[Any]] = {
        "iss": ["https://other.example", 7, None],
        "aud": ["nope", [], 42, ["nope"], None],
        "exp": [now - 3600, str(now + 300), True, 1e300, -1, None],
        "iat": [now + 3600, "now", None],
        "nbf": [now + 3600, "soon"],
        "kid": ["unknown-kid"],
    }
    broken = draw(st.sampled_from([None, None, None, None, *good]))
    claims = {
        name: draw(st.sampled_from(bad[name] if name == broken else good[name])) for name in good
    }
    kid = claims.pop("kid")
    subject = draw(st.sampled_from([JWT_CALLER, JWT_CALLER, "someone-else", "", 42, None]))
    payload = {
        name: value for name, value in {**claims, "sub": subject}.items() if value is not None
    }
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=10), JSON_VALUES, max_size=4))
    payload.update({k: v for k, v in extra.items() if k not in REGISTERED})
    # Signed as JSON bytes: PyJWT's encode() refuses some of these claims itself.
    token = jwt.api_jws.encode(
        json.dumps(payload).encode(),
        target.signer.key,
        algorithm=target.signer.alg,
        headers={"kid": kid},
    )
    if broken is not None or not isinstance(subject, str) or not subject:
        verdict = "bad"
    else:
        verdict = "jwt" if subject == JWT_CALLER else "other-jwt"
    _, body, signature = token.split(".")
    return Credential(f"Bearer {token}", verdict, [signature, body])


def credentials(target: Target) -> st.SearchStrategy[Credential]:
    shapes = [
        printable_values(target.api_key),
        huge_values(target.api_key),
        key_variations(target.api_key),
        unsigned_jwts(),
    ]
    if target.signer is not None:
        shapes += [signed_jwts(target), signed_jwts(target)]
    return st.one_of(shapes)


KEYS = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_."), min_size=1, max_size=20)


@st.composite
def other_entries(draw: st.DrawFn) -> tuple[tuple[str, str | bytes], list[str]]:
    """Metadata that is not a credential: `-bin` keys (an `authorization-bin` too), a hostile
    x-request-id, any other key. Returns the entry and the secrets in it."""
    secret = marker()
    kind = draw(st.sampled_from(["authorization-bin", "bin", "x-request-id", "text"]))
    if kind == "authorization-bin":
        return ("authorization-bin", b"Bearer " + secret.encode() + draw(st.binary())), [secret]
    if kind == "bin":
        key = draw(KEYS.filter(lambda k: not k.startswith("grpc"))) + "-bin"
        return (key, draw(st.binary(max_size=200)) + secret.encode()), [secret]
    value = draw(st.text(PRINTABLE, max_size=200))
    if kind == "x-request-id":
        return ("x-request-id", value), []  # echoed by design when sane: not a secret
    key = draw(KEYS.filter(lambda k: not k.startswith("grpc") and k != "authorization"))
    return (key, insert(value, secret, draw(st.integers(0, 200)))), [secret]


@dataclass
class MetadataCase:
    route: str
    metadata: list[tuple[str, str | bytes]]
    credentials: list[Credential]
    secrets: list[str] = field(default_factory=list)

    def size(self) -> int:
        return sum(len(k) + len(v) + 32 for k, v in self.metadata)


@st.composite
def metadata_cases(draw: st.DrawFn, target: Target) -> MetadataCase:
    # Routes without a credential of their own: the metadata drawn here is all there is.
    route = draw(st.sampled_from(sorted(n for n, r in target.routes.items() if not r.metadata)))
    count = draw(st.sampled_from([0, 1, 1, 1, 1, 2, 3]))
    creds = [draw(credentials(target)) for _ in range(count)]
    others = draw(st.lists(other_entries(), max_size=3))
    entries: list[tuple[str, str | bytes]] = [("authorization", c.value) for c in creds]
    entries += [entry for entry, _ in others]
    case = MetadataCase(route, list(draw(st.permutations(entries))), creds)
    case.secrets = [s for c in creds for s in c.secrets] + [s for _, ss in others for s in ss]
    return case


def expected_identity(target: Target, route: Route, case: MetadataCase) -> tuple[str, str] | None:
    """(authMethod, user) of the caller the README says this is, when the policy allows it;
    None when the call is refused. Raises PermissionError for an identity no rule names."""
    if not case.credentials:
        return route.identity  # the connection's own (a bad bearer never falls back to it)
    if len(case.credentials) > 1:
        return None
    verdict = case.credentials[0].verdict
    if verdict == "key":
        return ("apiKey", target.api_key_caller)
    if verdict == "jwt":
        return ("jwt", JWT_CALLER)
    if verdict == "other-jwt":
        raise PermissionError
    return None


async def check_metadata(target: Target, case: MetadataCase) -> None:
    route = target.routes[case.route]
    window = target.observe()
    outcome = await call_raw(route, target.valid_request.SerializeToString(), case.metadata)
    verdicts = ",".join(c.verdict for c in case.credentials)
    event(f"{route.name} [{verdicts}]: {outcome.code.name} {outcome.reason}")
    await target.check(window, outcome, [*case.secrets, target.api_key])
    if outcome.code == RESOURCE_EXHAUSTED and not outcome.broker_answered:
        # gRPC's own limit on metadata: only for metadata near or over it.
        assert case.size() > METADATA_SOFT_LIMIT - METADATA_MARGIN, (case.size(), outcome.status)
        return
    try:
        identity = expected_identity(target, route, case)
    except PermissionError:
        assert outcome.code == PERMISSION_DENIED, outcome.status
        return
    if identity is None:
        assert outcome.code == UNAUTHENTICATED, outcome.status
        return
    assert outcome.code == OK, outcome.status
    target.check_issued(outcome, target.valid_request)
    assert outcome.request_id is not None
    line = target.audit_line(window, outcome.request_id)
    assert (line["authMethod"], line["user"]) == identity


@settings(FUZZ_SETTINGS, max_examples=150)
@given(data=st.data())
async def test_raw_metadata(target: Target, data: st.DataObject) -> None:
    await check_metadata(target, data.draw(metadata_cases(target)))


async def test_what_grpc_refuses_before_the_broker(target: Target) -> None:
    """The limits the properties draw around: what the client library will not send, and what
    gRPC's server refuses before the broker's handler runs (no answer of the broker's, no
    audit line); the broker serves on."""
    route = next(r for r in target.routes.values() if r.authenticated and not r.metadata)
    body = target.valid_request.SerializeToString()
    refused_by_the_client: list[list[tuple[str, Any]]] = [
        [("authorization", "Bearer a\nb")],  # not printable ASCII
        [("authorization", "Bearer \x7f")],
        [("authorization", "Bearer é")],
        [("Authorization", "Bearer x")],  # keys are lowercase
        [("author ization", "x")],
        [("authorization-bin", "text")],  # -bin values are bytes
    ]
    for metadata in refused_by_the_client:
        window = target.observe()
        with pytest.raises(Exception) as raised:
            await call_raw(route, body, metadata)
        assert not isinstance(raised.value, aio.AioRpcError), metadata
        assert target.audit_text(window) == ""
    window = target.observe()
    outcome = await call_raw(route, body, [("authorization", "Bearer " + "a" * 17000)])
    assert outcome.code == RESOURCE_EXHAUSTED and not outcome.broker_answered
    assert outcome.request_id is None
    await target.check(window, outcome, ["a" * 17000])
    outcome = await call_raw(route, body)
    assert outcome.code == OK, outcome.status


# --- 3. certificate names ------------------------------------------------------------------------

SPIFFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
SPIFFE_ID = re.compile(r"spiffe://[a-z0-9._-]{1,255}(/[^/]*)*")
# Names beyond this make certificates that gRPC drops the connection for, right after the
# handshake (grpcio 1.85, certificates of ~9 KB to ~64 KB: "SSL_write failed with error
# SSL_ERROR_WANT_WRITE" in its log), before the broker sees any call.
MAX_NAMES_CHARS = 6000


def is_spiffe_id(uri: str) -> bool:
    """The README's SPIFFE ID rules, written out again (not broker.spiffe)."""
    if len(uri.encode("utf-8")) > 2048 or SPIFFE_ID.fullmatch(uri) is None:
        return False
    _, _, path = uri[len("spiffe://") :].partition("/")
    if "/" not in uri[len("spiffe://") :]:
        return True
    return all(
        SPIFFE_SEGMENT.fullmatch(segment) and segment not in (".", "..")
        for segment in path.split("/")
    )


@dataclass(frozen=True)
class Names:
    uris: tuple[str, ...]
    dns: tuple[str, ...]
    cns: tuple[str, ...]

    @property
    def cn(self) -> str | None:
        """The subject CN: exactly one (a non-empty one), else none."""
        return self.cns[0] if len(self.cns) == 1 and self.cns[0] else None

    def primary(self) -> tuple[str, str] | None:
        """The name the caller is known by: the (first) URI SAN, else the first DNS SAN, else
        the CN."""
        if self.uris:
            return ("uri", self.uris[0])
        if self.dns:
            return ("dns", self.dns[0])
        return ("cn", self.cn) if self.cn is not None else None

    def size(self) -> int:
        return sum(len(n) for n in (*self.uris, *self.dns, *self.cns))


def configured_rule(names: Names) -> str | None:
    """The FUZZ_POLICY rule that decides (the first that matches), per the README."""
    only_uri = names.uris[0] if len(names.uris) == 1 else None
    spiffe = only_uri if only_uri is not None and is_spiffe_id(only_uri) else None
    if spiffe is not None:
        segments = spiffe[len("spiffe://") :].split("/")
        if segments[0] == "example.org" and len(segments) == 3 and segments[1] == "ci":
            return "spiffe-ci"
        if segments[0] == "example.org" and len(segments) >= 3 and segments[1] == "deep":
            return "spiffe-deep"
    if only_uri is not None and only_uri.startswith("urn:example:"):
        return "uri-urn"
    if any(d.endswith(".runners.example") for d in names.dns):
        return "by-dns"
    if names.cn == "legacy-client":
        return "by-cn"
    return None


def dev_rule(names: Names) -> str | None:
    """The dev policy: any name in any field (a uri subject needs exactly one URI SAN)."""
    return "dev-everything" if len(names.uris) == 1 or names.dns or names.cn else None


ODD_TEXT = st.text(max_size=40)  # any unicode, NUL included
SEGMENTS = st.sampled_from(
    ["ci", "deep", "runner", "a", "..", ".", "", "%2e%2e", "%2F", "*", "a b", "é", "x" * 2100]
) | st.text(PRINTABLE, max_size=12)
TRUST_DOMAINS = st.sampled_from(
    ["example.org", "Example.org", "example.org:443", "user@example.org", "", "évil.org", "a" * 300]
)


@st.composite
def spiffe_like(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["spiffe://", "spiffe://", "SPIFFE://", "spiffe:/", "https://"]))
    path = "/".join(draw(st.lists(SEGMENTS, max_size=4)))
    suffix = draw(st.sampled_from(["", "", "/", "?admin=1", "#x"]))
    return scheme + draw(TRUST_DOMAINS) + ("/" + path if path else "") + suffix


URIS = st.one_of(
    spiffe_like(),
    st.sampled_from(["spiffe://example.org/ci/runner", "spiffe://example.org/deep/a/b"]),
    ODD_TEXT.map(lambda t: "urn:example:" + t),
    ODD_TEXT,
)
DNS_NAMES = st.one_of(
    st.sampled_from(
        [
            "build.runners.example",
            ".runners.example",
            "runners.example",
            "x.runners.example.",
            "*.runners.example",
            "é.runners.example",
            "spiffe://example.org/ci/x",
            "",
        ]
    ),
    ODD_TEXT.map(lambda t: t + ".runners.example"),
    ODD_TEXT,
)
CNS = st.one_of(
    st.sampled_from(
        ["legacy-client", "Legacy-client", "legacy-client ", "spiffe://example.org/ci/runner"]
    ),
    st.text(min_size=1, max_size=40),
    st.just("c" * 3000),
)
NAMES = st.builds(
    Names,
    uris=st.lists(URIS, max_size=3).map(tuple),
    dns=st.lists(DNS_NAMES, max_size=3).map(tuple),
    cns=st.one_of(st.just(("",)), st.lists(CNS, max_size=2).map(tuple)),
).filter(lambda names: names.size() <= MAX_NAMES_CHARS)


@pytest.fixture(params=["dev", "configured"])
async def mtls_target(
    request: pytest.FixtureRequest,
    kubernetes_settings: KubernetesSettings,
    emulator: Emulator,
    tmp_path: Path,
    pki: Pki,
) -> AsyncIterator[tuple[Target, Callable[[Names], str | None]]]:
    """A broker with mutual TLS: dev mode given `server.tls` (its dev policy lets any name
    in), or the configured one."""
    if request.param == "dev":
        async with dev_target(tmp_path, pki=pki) as dev:
            yield dev, dev_rule
    else:
        async with configured_target(kubernetes_settings, emulator, tmp_path, pki) as configured:
            yield configured, configured_rule


async def check_certificate(
    target: Target, rule_of: Callable[[Names], str | None], names: Names
) -> None:
    assert target.pki is not None
    cert, key = client_cert(
        target.pki.ca,
        uris=names.uris,
        dns=names.dns,
        cn=names.cns[0] if names.cns else None,
        more_cns=names.cns[1:],
        unchecked=True,
    )
    window = target.observe()
    async with mtls_channel(target.pki, target.server.address, cert=cert, key=key) as channel:
        route = Route("drawn certificate", channel)
        outcome = await call_raw(route, target.valid_request.SerializeToString())
    event(f"{outcome.code.name} {outcome.reason}")
    await target.check(window, outcome, [])
    primary = names.primary()
    if primary is None:
        assert outcome.code == UNAUTHENTICATED, outcome.status
        return
    rule = rule_of(names)
    assert outcome.code == (OK if rule is not None else PERMISSION_DENIED), outcome.status
    if outcome.code == OK:
        target.check_issued(outcome, target.valid_request)
    assert outcome.request_id is not None
    line = target.audit_line(window, outcome.request_id)
    field_name, name = primary
    assert (line["authMethod"], line["certificateField"], line["rule"]) == (
        "mtls",
        field_name,
        rule,
    )
    if len(name) <= 253:  # longer ones are cut, with a marker (see the README's audit log)
        assert line["user"] == name
    else:
        assert line["user"].startswith(name[:253]) and "(truncated: " in line["user"]


@settings(FUZZ_SETTINGS, max_examples=40)
@given(names=NAMES)
async def test_certificate_names(
    mtls_target: tuple[Target, Callable[[Names], str | None]], names: Names
) -> None:
    target, rule_of = mtls_target
    await check_certificate(target, rule_of, names)


def test_the_independent_spiffe_rules_agree_with_the_readme_examples() -> None:
    """The model above, on the README's own examples (so that a mistake in it shows here)."""
    assert is_spiffe_id("spiffe://example.org/ci/runner")
    assert is_spiffe_id("spiffe://example.org")
    for invalid in (
        "spiffe://example.org/ci/../admin",
        "spiffe://example.org/ci/./x",
        "spiffe://example.org/ci/%2e%2e",
        "spiffe://example.org/ci//runner",
        "spiffe://example.org/ci/runner/",
        "SPIFFE://example.org/ci/runner",
        "spiffe://example.org:443/ci/runner",
        "spiffe://example.org/ci/runner?admin=1",
        "spiffe://Example.org/ci",
        "spiffe:///ci",
    ):
        assert not is_spiffe_id(invalid), invalid
    assert configured_rule(Names(("spiffe://example.org/ci/runner",), (), ())) == "spiffe-ci"
    assert configured_rule(Names(("spiffe://example.org/ci/a/b",), (), ())) is None
    assert configured_rule(Names(("spiffe://example.org/deep/a/b",), (), ())) == "spiffe-deep"
    assert configured_rule(Names(("spiffe://example.org/deep",), (), ())) is None
    two = ("spiffe://example.org/ci/runner", "spiffe://example.org/ci/other")
    assert configured_rule(Names(two, (), ())) is None
    assert configured_rule(Names((), ("a.example", "b.runners.example"), ())) == "by-dns"
    assert configured_rule(Names((), (), ("legacy-client",))) == "by-cn"
    assert configured_rule(Names((), (), ("legacy-client", "x"))) is None
    assert configured_rule(Names((), ("spiffe://example.org/ci/x",), ())) is None
    assert fnmatchcase(".runners.example", "*.runners.example")  # `*` matches nothing too


def test_a_certificate_that_makes_a_library_warn_is_logged_as_one_line(
    pki: Pki, restore_logging: None
) -> None:
    """Found by test_certificate_names: reading a client certificate whose CN is longer than
    X.509's 64 characters makes cryptography warn (UserWarning). Python writes warnings to
    stderr itself: two lines of plain text in a stream of JSON log lines, written synchronously
    on the event loop. The broker's logging takes them: one log line, on `py.warnings`."""
    stream = io.StringIO()
    cert, _ = client_cert(pki.ca, cn="c" * 100, unchecked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # whether it warned before in this process or not
        setup_logging(LogSettings(format="json"), stream)
        identity = certificate_identity(cert)
    assert identity is not None and identity.name == "c" * 100
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [warned] = [line for line in lines if line["logger"] == "py.warnings"]
    assert warned["level"] == "warning" and "UserWarning" in warned["message"]
