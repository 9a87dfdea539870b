"""What reached the token endpoint: tests count these to prove a request never got there."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiDict, MultiDictProxy, MultiMapping


@dataclass
class RecordedRequest:
    """One authenticated request to POST .../serviceaccounts/{name}/token.

    Holds no credential: not the caller's bearer token, not the issued token.
    """

    namespace: str
    name: str
    user: str
    groups: tuple[str, ...]
    content_type: str
    body: Any  # the parsed body (JSON form, protobuf converted), None if it did not parse
    query: MultiDictProxy[str]  # .get() gives the first value, .getall() every value
    received_at: float = field(default_factory=time.time)
    status: int | None = None  # the HTTP status sent; None while pending or when dropped
    dropped: bool = False  # the connection was aborted without a response (a fault)
    fault: str | None = None  # e.g. "fail 503", "drop"; None when not faulted
    warnings: list[str] = field(default_factory=list)
    audit_annotations: dict[str, str] = field(default_factory=dict)  # issued-credential-id

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "user": self.user,
            "groups": list(self.groups),
            "contentType": self.content_type,
            "body": self.body,
            "query": {k: self.query.getall(k) for k in dict.fromkeys(self.query.keys())},
            "receivedAt": self.received_at,
            "status": self.status,
            "dropped": self.dropped,
            "fault": self.fault,
            "warnings": list(self.warnings),
            "auditAnnotations": dict(self.audit_annotations),
        }


def frozen_query(query: MultiMapping[str]) -> MultiDictProxy[str]:
    return MultiDictProxy(MultiDict(query))


class RequestLog:
    """The recorded token requests and the concurrency seen at the token endpoint."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.in_flight_max = 0

    def enter(self, record: RecordedRequest) -> None:
        self.requests.append(record)
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1

    def reset(self) -> None:
        """Forget recorded requests and the maximum (requests in flight stay counted)."""
        self.requests.clear()
        self.in_flight_max = self.in_flight
