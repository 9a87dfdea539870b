"""The catalogue of ErrorInfo reasons (broker/reasons.py): complete, consistent with the code
that raises the refusals, and the docs' table (docs/troubleshooting.md) generated from it."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import broker
from broker.authn import AuthenticationFailed
from broker.errors import ERROR_DOMAIN, KUBERNETES_DOMAIN, BrokerError
from broker.policy import DENY_REASONS, Decision
from broker.reasons import (
    ALLOWED,
    CANCELLED,
    KUBERNETES_CODES,
    Reason,
    default_status_reason,
    is_relayed,
    kubernetes_code,
    kubernetes_reason,
    markdown_table,
)
from broker.upstream import _status_failure

PACKAGE = Path(broker.__file__).parent
REPO = PACKAGE.parent
# The README and the documentation site's pages: wherever a reason is named.
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TROUBLESHOOTING = REPO / "docs" / "troubleshooting.md"
NAMES = {reason.value for reason in Reason}
# The one place that builds a BrokerError without a catalogue entry: the relayed family
# KUBERNETES_<REASON>, whose reason is the API server's (checked below over every status).
RELAY = ("upstream.py", "_status_failure")
TABLE_BEGIN = "<!-- BEGIN GENERATED: reasons -->"
TABLE_END = "<!-- END GENERATED: reasons -->"


def broker_modules() -> Iterator[tuple[str, ast.Module]]:
    """The broker's own modules (not the generated code, the emulator or the catalogue)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ("gen", "emulator") or relative.name == "reasons.py":
            continue
        yield str(relative), ast.parse(path.read_text(), str(path))


def error_classes() -> set[str]:
    """BrokerError and the broker's subclasses of it."""
    names = {"BrokerError"}
    for _, module in broker_modules():
        for node in ast.walk(module):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(base, ast.Name) and base.id in names for base in node.bases
            ):
                names.add(node.name)
    return names


def enclosing_functions(module: ast.Module) -> dict[ast.AST, str]:
    """The innermost function around each node (ast.walk visits outer functions first)."""
    owner: dict[ast.AST, str] = {}
    for node in ast.walk(module):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if inner is not node:
                    owner[inner] = node.name
    return owner


# --- the catalogue itself ------------------------------------------------------------------------


def test_each_entry_is_a_well_formed_reason_with_one_line_meaning_and_action() -> None:
    for reason in Reason:
        assert reason.value == reason.name
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+[A-Z0-9]", reason.value) and len(reason.value) <= 63
        assert reason.domain in (ERROR_DOMAIN, KUBERNETES_DOMAIN)
        for text in (reason.meaning, reason.action):
            assert text and "\n" not in text and len(text) <= 200, reason
        assert reason.codes and all(isinstance(code, grpc.StatusCode) for code in reason.codes)
        assert not {grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN} & set(reason.codes)
    assert not {ALLOWED, CANCELLED} & NAMES  # outcome names of audit lines, never ErrorInfo


def test_retryable_entries_agree_with_the_codes_clients_retry() -> None:
    """The Python client (and a service config retryPolicy) retries UNAVAILABLE: a reason
    answered UNAVAILABLE must be one a retry can help."""
    for reason in Reason:
        if grpc.StatusCode.UNAVAILABLE in reason.codes:
            assert reason.retryable, reason
        if set(reason.codes) <= {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.NOT_FOUND,
        }:
            assert not reason.retryable, reason


def test_the_broker_s_own_reasons_have_exactly_one_code() -> None:
    for reason in Reason:
        if reason.domain == ERROR_DOMAIN:
            assert len(reason.codes) == 1, reason
            assert reason.code == reason.codes[0]
    with pytest.raises(ValueError):
        _ = Reason.KUBERNETES_UNKNOWN.code  # the code follows the HTTP status


def test_listed_kubernetes_reasons_follow_the_family_pattern() -> None:
    relayed = [r for r in Reason if r.domain == KUBERNETES_DOMAIN]
    assert relayed
    for reason in relayed:
        assert is_relayed(reason.value, reason.domain)
        if reason.http_status is None:
            assert reason is Reason.KUBERNETES_UNKNOWN
            continue
        assert reason.status_reason is not None
        assert reason.value == kubernetes_reason(reason.status_reason)
        assert reason.codes == (kubernetes_code(reason.http_status),)
        assert reason.retryable == (reason.codes == (grpc.StatusCode.UNAVAILABLE,))
        assert default_status_reason(reason.http_status) == reason.status_reason
    # The broker's own KUBERNETES_* reasons are of its domain, not the family.
    assert not is_relayed(Reason.KUBERNETES_UNREACHABLE, Reason.KUBERNETES_UNREACHABLE.domain)


def test_policy_denials_are_the_permission_denied_entries() -> None:
    denials = {
        r
        for r in Reason
        if r.domain == ERROR_DOMAIN and r.codes == (grpc.StatusCode.PERMISSION_DENIED,)
    }
    assert set(DENY_REASONS) == denials
    for reason in DENY_REASONS:
        rule = None if reason is Reason.NO_MATCHING_RULE else "r"
        error = Decision(allowed=False, reason=reason, message="m", rule=rule).error()
        assert (error.code, error.reason, error.domain) == (reason.code, reason, ERROR_DOMAIN)
        assert set(error.metadata) <= set(reason.metadata)


def test_of_takes_code_and_domain_from_the_entry() -> None:
    error = BrokerError.of(Reason.RATE_LIMITED, "slow down", metadata={"scope": "caller"})
    assert (error.code, error.message, error.reason, error.domain) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "slow down",
        "RATE_LIMITED",
        ERROR_DOMAIN,
    )
    assert type(error.reason) is str  # the plain string, as decoded from the wire
    failed = AuthenticationFailed.of(Reason.CREDENTIALS_INVALID, "no", method="jwt")
    assert isinstance(failed, AuthenticationFailed)
    assert (failed.code, failed.method) == (grpc.StatusCode.UNAUTHENTICATED, "jwt")
    with pytest.raises(ValueError):
        BrokerError.of(Reason.KUBERNETES_UNKNOWN, "which code?")


# --- the code raises what the catalogue says ----------------------------------------------------


def test_no_reason_is_spelled_outside_the_catalogue() -> None:
    """Every reason string in the broker's code comes from broker.reasons."""
    spelled = [
        f"{path}:{node.lineno} {node.value!r}"
        for path, module in broker_modules()
        for node in ast.walk(module)
        if isinstance(node, ast.Constant) and node.value in NAMES | {ALLOWED, CANCELLED}
    ]
    assert not spelled


def test_every_refusal_is_built_from_a_catalogue_entry() -> None:
    """BrokerError (and subclasses) are built with `.of(Reason.X, ...)`, with the metadata
    keys the entry lists; only the Kubernetes relay builds one directly. And every entry of
    the broker's own is raised somewhere."""
    classes = error_classes()
    assert {"BrokerError", "AuthenticationFailed", "IssuedTokenRefused"} <= classes
    direct, built, referenced = [], set(), set()
    for path, module in broker_modules():
        owner = enclosing_functions(module)
        for node in ast.walk(module):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Reason"
            ):
                assert node.attr in Reason.__members__ or node.attr == "code", (path, node.attr)
                referenced.add(node.attr)
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in classes:
                direct.append((path, owner.get(node)))
            elif (
                isinstance(func, ast.Attribute)
                and func.attr == "of"
                and isinstance(func.value, ast.Name)
                and func.value.id in classes
            ):
                first = node.args[0]
                if isinstance(first, ast.Attribute):
                    reason = Reason[first.attr]
                    built.add(reason)
                    for keyword in node.keywords:
                        if keyword.arg == "metadata" and isinstance(keyword.value, ast.Dict):
                            keys = {
                                k.value for k in keyword.value.keys if isinstance(k, ast.Constant)
                            }
                            assert keys <= set(reason.metadata), (path, reason, keys)
                else:  # a policy Decision's own reason, looked up: Reason(self.reason)
                    assert (path, owner.get(node)) == ("policy.py", "error"), path
    assert direct == [RELAY]
    own = {r for r in Reason if r.domain == ERROR_DOMAIN}
    assert own - set(DENY_REASONS) <= built
    assert {r.name for r in own} <= referenced


@pytest.mark.parametrize("body_reason", ["", "NotFound", "AlreadyExists", "Gone", "ServerTimeout"])
def test_every_relayed_answer_is_of_the_family(body_reason: str) -> None:
    """Whatever the API server answers (every non-2xx HTTP status, with or without a Status
    reason), the relayed error is in the catalogue: a listed entry with its code, or the
    family `KUBERNETES_<REASON>` with one of its codes."""
    for status in range(300, 600):
        body = (
            b'{"kind": "Status", "reason": "%s", "message": "m"}' % body_reason.encode()
            if body_reason
            else b""
        )
        error = _status_failure(status, {}, body).error
        assert error.domain == KUBERNETES_DOMAIN
        assert is_relayed(error.reason, error.domain)
        assert error.code in KUBERNETES_CODES
        assert set(error.metadata) <= set(Reason.KUBERNETES_UNKNOWN.metadata)
        listed = Reason(error.reason) if error.reason in NAMES else None
        if listed is not None and listed.http_status in (status, None):
            # The code follows the status: a listed entry's is that of its usual status.
            assert error.code in listed.codes, (status, error.reason)
        if not body_reason:  # the reason every status carries by default is listed
            assert error.reason in NAMES, status


# --- the docs -------------------------------------------------------------------------------------


def test_docs_errors_table_is_the_generated_one() -> None:
    """docs/troubleshooting.md's reason table is markdown_table() between the markers
    (regenerate it with `make docs-gen`)."""
    text = TROUBLESHOOTING.read_text()
    assert text.count(TABLE_BEGIN) == 1 and text.count(TABLE_END) == 1
    block = text.split(TABLE_BEGIN)[1].split(TABLE_END)[0]
    assert block.strip("\n") == markdown_table().strip("\n")
    table = markdown_table()
    for reason in Reason:
        assert f"`{reason.value}`" in table


# Backticked UPPER_SNAKE names in the README and docs that are not reasons: gRPC codes and health
# statuses, environment variables, system constants, the audit line's outcome names.
NOT_REASONS = re.compile(
    r"TOKEN_BROKER_\w+|\w+_PROXY|KUBERNETES_EXEC_INFO|SO_\w+|O_\w+|SIG\w+|E[A-Z]+|SETTINGS_\w+"
    r"|(NOT_)?SERVING|TYPE_CHECKING|PATH|BLOCKS"
)


def test_docs_name_only_catalogued_reasons() -> None:
    """Wherever the README or a page of the docs names a reason (tables of its own in other
    sections included), it is one the catalogue has."""
    text = "\n".join(path.read_text() for path in DOCUMENTS)
    names = set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`", text))
    codes = {code.name for code in grpc.StatusCode}
    unknown = {
        name
        for name in names - NAMES - codes - {ALLOWED, CANCELLED}
        if not NOT_REASONS.fullmatch(name)
    }
    assert not unknown
