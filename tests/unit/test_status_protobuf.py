"""A `Status` in the Kubernetes protobuf encoding (broker.apiserver.wire.encode_status and
`StatusError.protobuf`), checked with an independent decoder: a protobuf wire reader written
here (no descriptor), and the upstream field numbers
(k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto):

    Status        metadata=1 (ListMeta) status=2 message=3 reason=4 details=5 code=6
    StatusDetails name=1 group=2 kind=3 causes=4 retryAfterSeconds=5 uid=6
    StatusCause   reason=1 message=2 field=3
    ListMeta      selfLink=1 resourceVersion=2 continue=3 remainingItemCount=4
    runtime.Unknown typeMeta=1 (apiVersion=1 kind=2) raw=2 contentEncoding=3 contentType=4

Go's generated marshaller writes every non-pointer field (empty strings and zeros too) in
field-number order, `details` only when non-nil: the bytes must be exactly those."""

from __future__ import annotations

from broker.apiserver import status as kstatus
from broker.apiserver import wire

Field = tuple[int, int, int | bytes]  # (number, wire type, value)


def varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def fields(data: bytes) -> list[Field]:
    """Every field of a message, in the order written (varints and length-delimited only)."""
    out: list[Field] = []
    at = 0
    while at < len(data):
        key, at = varint(data, at)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, at = varint(data, at)
            out.append((number, kind, value))
        elif kind == 2:
            length, at = varint(data, at)
            out.append((number, kind, data[at : at + length]))
            at += length
        else:
            raise AssertionError(f"unexpected wire type {kind}")
    assert at == len(data)
    return out


def numbers(message: list[Field]) -> list[int]:
    return [number for number, _, _ in message]


def value(message: list[Field], number: int) -> int | bytes:
    [found] = [v for n, _, v in message if n == number]
    return found


def status_of(envelope: bytes) -> list[Field]:
    """The Status message of a `k8s\\0` envelope, after checking the envelope field by field."""
    assert envelope[:4] == b"k8s\x00"
    unknown = fields(envelope[4:])
    assert numbers(unknown) == [1, 2, 3, 4]
    type_meta = value(unknown, 1)
    assert isinstance(type_meta, bytes)
    assert fields(type_meta) == [(1, 2, b"v1"), (2, 2, b"Status")]
    assert value(unknown, 3) == b"" and value(unknown, 4) == b""
    raw = value(unknown, 2)
    assert isinstance(raw, bytes)
    return fields(raw)


def test_a_forbidden_status_field_by_field() -> None:
    error = kstatus.forbidden("serviceaccounts", "x", "no policy rule allows it")
    assert error.details is not None
    error.details["causes"] = [{"reason": "NO_MATCHING_RULE", "message": "no policy rule"}]
    status = status_of(error.protobuf())
    assert numbers(status) == [1, 2, 3, 4, 5, 6]
    # ListMeta: its three strings, empty (remainingItemCount is a pointer: absent).
    list_meta = value(status, 1)
    assert isinstance(list_meta, bytes) and list_meta == b"\x0a\x00\x12\x00\x1a\x00"
    assert value(status, 2) == b"Failure"
    assert value(status, 3) == b'serviceaccounts "x" is forbidden: no policy rule allows it'
    assert value(status, 4) == b"Forbidden"
    assert value(status, 6) == 403
    details = value(status, 5)
    assert isinstance(details, bytes)
    decoded = fields(details)
    assert numbers(decoded) == [1, 2, 3, 4, 5, 6]
    assert decoded[:3] == [(1, 2, b"x"), (2, 2, b""), (3, 2, b"serviceaccounts")]
    assert decoded[4:] == [(5, 0, 0), (6, 2, b"")]
    cause = decoded[3][2]
    assert isinstance(cause, bytes)
    assert fields(cause) == [(1, 2, b"NO_MATCHING_RULE"), (2, 2, b"no policy rule"), (3, 2, b"")]


def test_the_exact_bytes_of_a_status_with_retry_after_and_two_causes() -> None:
    error = kstatus.StatusError(
        429,
        "TooManyRequests",
        "slow down",
        {
            "name": "sa",
            "kind": "serviceaccounts",
            "causes": [{"reason": "RATE_LIMITED", "message": "m"}, {"field": "spec"}],
            "retryAfterSeconds": 300,
        },
    )
    first_cause = b"\x22\x13\x0a\x0cRATE_LIMITED\x12\x01m\x1a\x00"
    causes = first_cause + b"\x22\x0a\x0a\x00\x12\x00\x1a\x04spec"
    details = b"\x0a\x02sa\x12\x00\x1a\x0fserviceaccounts" + causes + b"\x28\xac\x02\x32\x00"
    raw = (
        b"\x0a\x06\x0a\x00\x12\x00\x1a\x00"
        + b"\x12\x07Failure"
        + b"\x1a\x09slow down"
        + b"\x22\x0fTooManyRequests"
        + b"\x2a"
        + bytes([len(details)])
        + details
        + b"\x30\xad\x03"
    )
    assert wire.encode_status(error.body()) == raw
    type_meta = b"\x0a\x0c\x0a\x02v1\x12\x06Status"
    assert error.protobuf() == (
        b"k8s\x00" + type_meta + b"\x12" + bytes([len(raw)]) + raw + b"\x1a\x00\x22\x00"
    )


def test_no_details_no_field_5_and_empty_details_all_their_fields() -> None:
    unauthorized = status_of(kstatus.unauthorized().protobuf())
    assert numbers(unauthorized) == [1, 2, 3, 4, 6]
    assert (value(unauthorized, 3), value(unauthorized, 6)) == (b"Unauthorized", 401)
    # `details: {}` in JSON (a non-nil, empty StatusDetails in Go): its fields, all empty.
    not_found = status_of(kstatus.path_not_found().protobuf())
    assert value(not_found, 5) == b"\x0a\x00\x12\x00\x1a\x00\x28\x00\x32\x00"
    # StatusReasonUnknown: the reason field is still written, empty.
    unknown = status_of(kstatus.unknown_error(500, "boom").protobuf())
    assert value(unknown, 4) == b""


def test_text_that_is_not_utf8_becomes_the_replacement_character() -> None:
    # A lone surrogate (from a JSON-escaped claim, say) cannot be UTF-8: Go holds U+FFFD.
    error = kstatus.forbidden("serviceaccounts", "x", "caller \ud800 refused")
    message = value(status_of(error.protobuf()), 3)
    assert isinstance(message, bytes)
    assert message.decode("utf-8") == 'serviceaccounts "x" is forbidden: caller \ufffd refused'
