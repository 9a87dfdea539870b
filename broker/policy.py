"""Who may get which tokens: a default-deny, first-match policy read from a YAML file.

```yaml
rules:
  - name: ci-deploys                 # unique; named in audit lines and in denials it decides
    subjects:                        # at least one; the caller must match one of them
      - {method: mtls, field: uri, name: "spiffe://example.org/ci/*"}   # field: uri|dns|cn
      - method: jwt                  # mtls | apiKey | jwt | unixSocket
        issuer: https://token.actions.githubusercontent.com   # exact; required for jwt
        name: "repo:example/app:*"
        claims: {repository_owner: example, ref: ["refs/heads/main", "refs/tags/*"]}
    namespaces: [ci, "team-*"]
    serviceAccounts: [deployer]
    audiences: [vault]               # allowlist (exact); default: none
    defaultAudiences: [vault]        # when the request names none; each in `audiences`
    allowApiServerAudience: false    # allow an audience-less token (the API server's own)
    defaultExpiration: 10m           # Go durations (10m, 1h, 90s) or integer seconds
    maxExpiration: 1h                # >= 10m; default 1h
    onLongerExpiration: cap          # cap (shorten, with a warning; default) | reject
    boundObject: {required: true, kinds: [Pod]}   # default: not required, any kind
    allowDryRun: false               # default false
    cache: {enabled: true}           # false: never serve this rule's tokens from the cache
    rateLimit:                       # replaces rateLimit.perCaller / perServiceAccount
      perCaller: {rate: 1, burst: 5} # requests/second, burst; null: no limit for this rule
```

Semantics, firewall style:

- Rules are evaluated in file order. A rule *matches* when one of its subjects matches the
  caller's `Identity` and the request's namespace and service account each match one of its
  globs. The FIRST matching rule decides, allowing or denying; later rules are not consulted.
  No matching rule: denied, NO_MATCHING_RULE. An empty `rules: []` denies everything.
- Globs are `fnmatch.fnmatchcase` (case-sensitive; `*` also matches `/`). A subject matches
  when the method is equal, the name matches its glob, and for jwt the issuer is equal and
  every listed claim matches: a string claim must match one of the globs; a list claim
  must have an element matching one; other claim types and missing claims never match.
  Claim names are top-level claims.
- mtls subjects match one field of the client certificate (`Identity.certificate`), never
  falling back to another: `field: uri` (the default) the URI SAN, and only when the
  certificate has exactly one (as an X509-SVID does); `field: dns` any of its DNS SANs;
  `field: cn` its subject CN. A name with the spiffe scheme is a SPIFFE ID pattern
  (broker.spiffe: validated at load; `*` within one path segment, `**` for one or more
  segments; the trust domain exact) and matches only a URI SAN that is a valid SPIFFE ID.
- The deciding rule then checks, in this order, denying with the first that fails:
  DRY_RUN_NOT_ALLOWED, BOUND_OBJECT_REQUIRED, BOUND_KIND_NOT_ALLOWED, AUDIENCE_REQUIRED
  (no requested audiences, no defaultAudiences, and allowApiServerAudience not set: a token
  for the API server's own audience is never handed out silently), AUDIENCE_NOT_ALLOWED
  (every requested audience must be in `audiences`), EXPIRATION_TOO_LONG (reject only).
- Grant: the requested audiences, else defaultAudiences (which win over
  allowApiServerAudience). The requested expiration, else defaultExpiration, else none (the
  API server's default, 3600s, which counts as 3600 against maxExpiration). Longer than
  maxExpiration: `cap` grants maxExpiration with the API server's warning
  `requested expiration of X seconds shortened to Y seconds` (X is 3600 when the request
  named none); `reject` denies.
- A Pod-bound grant of exactly 3607 s under a maxExpiration shorter than a year is granted as
  3606 s, with the same warning: kube-apiserver would extend a 3607 s Pod-bound token for its
  own audiences to a year (and which audiences are its own is not known here). Whatever the
  API server does, the token it mints is checked against maxExpiration before anyone gets it
  (`Decision.max_expiration_seconds`, broker.issued_token.check_lifetime).

Denial messages are safe for the caller: they say which constraint failed, never what other
rules or the audience allowlist contain. `explain` (for the CLI's operators) tells all.
`decide` expects a request that passed `broker.validation.validate_create_token`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from broker.errors import BrokerError
from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
from broker.identity import CERTIFICATE_FIELDS, FIELD_TITLES, CertificateNames, Identity
from broker.policy_schema import (
    EXPIRATION_EXTENSION_SECONDS,
    SERVER_DEFAULT_EXPIRATION_SECONDS,
    WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS,
    PolicyDocument,
    PolicyError,
    Rule,
    RuleRateLimit,
    Subject,
    parse_document,
)
from broker.reasons import ALLOWED, Reason
from broker.spiffe import looks_like_spiffe, spiffe_id_problem
from broker.validation import go_quote

# The permissive policy of `serve --dev`. Never for production.
DEV_POLICY_FILE = Path(__file__).parent / "dev-policy.yaml"

# The reasons of a denial (broker.reasons), in the order the deciding rule's checks run.
DENY_REASONS = (
    Reason.NO_MATCHING_RULE,
    Reason.DRY_RUN_NOT_ALLOWED,
    Reason.BOUND_OBJECT_REQUIRED,
    Reason.BOUND_KIND_NOT_ALLOWED,
    Reason.AUDIENCE_REQUIRED,
    Reason.AUDIENCE_NOT_ALLOWED,
    Reason.EXPIRATION_TOO_LONG,
)

__all__ = ["DEV_POLICY_FILE", "Decision", "Explanation", "Policy", "PolicyError", "RuleExplanation"]


@dataclass(frozen=True)
class Decision:
    """The outcome for one request; when allowed, the effective grant."""

    allowed: bool
    # ALLOWED, or the denial's reason (one of DENY_REASONS).
    reason: str
    # Safe to show the caller.
    message: str
    # The deciding rule; None when no rule matched.
    rule: str | None = None
    audiences: tuple[str, ...] = ()
    # None: the request names none and neither does the rule (the API server's default).
    expiration_seconds: int | None = None
    warnings: tuple[str, ...] = ()
    # The deciding rule lets the token cache serve the grant (`cache.enabled`); False on denials.
    cacheable: bool = False
    # The deciding rule's `rateLimit` overrides (broker.ratelimit); None: the settings' limits.
    rate_limit: RuleRateLimit | None = None
    # The deciding rule's maxExpiration (allowed decisions): the longest the token actually
    # minted may be valid for (broker.issued_token.check_lifetime).
    max_expiration_seconds: int | None = None

    def effective_request(self, request: pb.CreateTokenRequest) -> pb.CreateTokenRequest:
        """A copy of the request with the granted audiences and expiration filled in."""
        if not self.allowed:
            raise ValueError(f"the request was denied ({self.reason})")
        out = pb.CreateTokenRequest()
        out.CopyFrom(request)
        spec = out.token_request.spec
        spec.ClearField("audiences")
        spec.audiences.extend(self.audiences)
        if self.expiration_seconds is None:
            spec.ClearField("expiration_seconds")
        else:
            spec.expiration_seconds = self.expiration_seconds
        return out

    def error(self) -> BrokerError:
        """PERMISSION_DENIED with ErrorInfo.reason = the reason (and `rule` if one matched)."""
        if self.allowed:
            raise ValueError("the request was allowed")
        return BrokerError.of(
            Reason(self.reason),
            self.message,
            metadata={"rule": self.rule} if self.rule is not None else {},
        )


@dataclass(frozen=True)
class RuleExplanation:
    index: int
    name: str
    # Subjects, namespaces and service accounts all match.
    matched: bool
    # This rule decided (the first that matched).
    deciding: bool
    # Why it does not match (empty when it matches).
    mismatches: tuple[str, ...] = ()
    # The subjects that match the caller, and how (for mtls: which certificate field).
    subject_matches: tuple[str, ...] = ()


@dataclass(frozen=True)
class Explanation:
    """The decision and, for every rule, whether and why (not) it matched. Operators only."""

    decision: Decision
    rules: tuple[RuleExplanation, ...] = ()


class Policy:
    """A validated policy; immutable. `decide` is pure."""

    def __init__(self, document: PolicyDocument, source: str = "<policy>") -> None:
        self.rules: tuple[Rule, ...] = document.rules
        self.source = source
        # Rules whose meaning changed with certificate fields (`policy validate` shows them).
        self.warnings: tuple[str, ...] = tuple(meaning_changes(document))

    @classmethod
    def from_dict(cls, data: object, source: str = "<policy>") -> Policy:
        return cls(parse_document(data, source), source)

    @classmethod
    def from_yaml(cls, text: str | bytes, source: str = "<policy>") -> Policy:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy {source} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise PolicyError(f"invalid policy {source}: top level must be a mapping with rules")
        return cls.from_dict(data, source)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read and validate a policy file (blocking: call off the event loop)."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise PolicyError(f"cannot read policy file {path}: {exc.strerror}") from None
        return cls.from_yaml(raw, str(path))

    def __repr__(self) -> str:
        return f"Policy({self.source!r}, {len(self.rules)} rules)"

    def decide(self, identity: Identity, request: pb.CreateTokenRequest) -> Decision:
        for rule in self.rules:
            if _rule_matches(rule, identity, request):
                return _decide_with(rule, request)
        return Decision(
            allowed=False,
            reason=Reason.NO_MATCHING_RULE,
            message=(
                f"no policy rule allows {go_quote(str(identity))} to request tokens for "
                f"service account {go_quote(request.service_account)} in namespace "
                f"{go_quote(request.namespace)}"
            ),
        )

    def explain(self, identity: Identity, request: pb.CreateTokenRequest) -> Explanation:
        decision = self.decide(identity, request)
        out = []
        for i, rule in enumerate(self.rules):
            mismatches = tuple(_mismatches(rule, identity, request))
            out.append(
                RuleExplanation(
                    index=i,
                    name=rule.name,
                    matched=not mismatches,
                    deciding=rule.name == decision.rule,
                    mismatches=mismatches,
                    subject_matches=tuple(
                        f"subjects[{j}]: {_how_subject_matches(subject, identity)}"
                        for j, subject in enumerate(rule.subjects)
                        if _subject_mismatch(subject, identity) is None
                    ),
                )
            )
        return Explanation(decision=decision, rules=tuple(out))


# --- matching -----------------------------------------------------------------------------


def _any_glob(value: str, globs: Iterable[str]) -> bool:
    return any(fnmatchcase(value, g) for g in globs)


def _claim_matches(value: Any, globs: Sequence[str]) -> bool:
    if isinstance(value, str):
        return _any_glob(value, globs)
    if isinstance(value, list | tuple):
        return any(isinstance(v, str) and _any_glob(v, globs) for v in value)
    return False


def _subject_mismatch(subject: Subject, identity: Identity) -> str | None:
    """Why the subject does not match the identity; None when it does."""
    if subject.method != identity.method:
        return f"method is {identity.method}, not {subject.method}"
    if subject.issuer is not None and identity.issuer != subject.issuer:
        return f"issuer {identity.issuer!r} is not {subject.issuer!r}"
    if identity.certificate is not None:
        return _certificate_mismatch(subject, identity.certificate)
    if not fnmatchcase(identity.name, subject.name):
        return f"name {identity.name!r} does not match {subject.name!r}"
    claims: Mapping[str, Any] = identity.claims
    for claim, globs in subject.claims.items():
        if claim not in claims:
            return f"claim {claim!r} is missing"
        if not _claim_matches(claims[claim], globs):
            return f"claim {claim!r} ({claims[claim]!r}) does not match {list(globs)!r}"
    return None


def _certificate_mismatch(subject: Subject, certificate: CertificateNames) -> str | None:
    """Why an mtls subject does not match the certificate's names; None when it does."""
    field = subject.certificate_field
    values = certificate.values(field)
    title = FIELD_TITLES[field]
    if not values:
        return f"the certificate has no {title}{_other_fields(subject, certificate)}"
    if field == "uri":
        if len(values) > 1:
            return f"the certificate has {len(values)} URI SANs (a uri subject needs exactly one)"
        pattern = subject.spiffe_pattern
        if pattern is not None:
            uri = values[0]
            if certificate.spiffe_id is None:
                return f"URI SAN {uri!r} is not a SPIFFE ID: {spiffe_id_problem(uri)}"
            if not pattern.matches(uri):
                return f"SPIFFE ID {uri!r} does not match {subject.name!r}"
            return None
    if not any(fnmatchcase(value, subject.name) for value in values):
        shown = ", ".join(repr(v) for v in values)
        return (
            f"{title} {shown} does not match {subject.name!r}{_other_fields(subject, certificate)}"
        )
    return None


def _other_fields(subject: Subject, certificate: CertificateNames) -> str:
    """A hint: which of the certificate's other fields would match, and why they do not."""
    spiffe = subject.spiffe_pattern is not None
    hints = [
        f"its {FIELD_TITLES[f]} {value!r} is not a URI SAN: a SPIFFE ID pattern matches only "
        "a URI SAN"
        if spiffe
        else f"its {FIELD_TITLES[f]} {value!r} would need `field: {f}`"
        for f in CERTIFICATE_FIELDS
        if f != subject.certificate_field
        for value in certificate.values(f)[:1]
        if (looks_like_spiffe(value) if spiffe else fnmatchcase(value, subject.name))
    ]
    return f" ({'; '.join(hints)})" if hints else ""


def _how_subject_matches(subject: Subject, identity: Identity) -> str:
    """How a matching subject matches (for `explain`): for mtls, which certificate field."""
    certificate = identity.certificate
    if certificate is None:
        return f"{identity.method} name {identity.name!r} matches {subject.name!r}"
    field = subject.certificate_field
    if subject.spiffe_pattern is not None:
        what, value = "SPIFFE ID", certificate.spiffe_id
    else:
        what = FIELD_TITLES[field]
        value = next(v for v in certificate.values(field) if fnmatchcase(v, subject.name))
    return f"{what} {value!r} matches {subject.name!r} (certificate field: {field})"


def meaning_changes(document: PolicyDocument) -> Iterator[str]:
    """The mtls subjects whose meaning changed when subjects got a certificate `field`, and
    what to write instead. A subject with an explicit `field` was written for the new
    meaning: it never warns."""
    for i, rule in enumerate(document.rules):
        for j, subject in enumerate(rule.subjects):
            if subject.method != "mtls" or subject.field is not None:
                continue
            where = f"rules[{i}].subjects[{j}] (rule {rule.name})"
            pattern = subject.spiffe_pattern
            if pattern is not None:
                if pattern.has_segment_wildcard:
                    yield (
                        f"{where}: '*' in {subject.name!r} now matches within one path "
                        "segment (it matched across '/' before, e.g. nested IDs): write '**' "
                        "as a segment for any depth; add `field: uri` to confirm"
                    )
            elif not _URI_SCHEME.match(subject.name):
                yield (
                    f"{where}: name {subject.name!r} matched the certificate's URI SAN, else "
                    "its first DNS SAN, else its CN; it now matches the URI SAN only: for a "
                    "DNS SAN or the CN write this subject with `field: dns` or `field: cn` "
                    "(one subject per field); add `field: uri` to keep the URI SAN only"
                )


# A name that starts like an absolute URI (scheme ":"): meant for the URI SAN.
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def _rule_matches(rule: Rule, identity: Identity, request: pb.CreateTokenRequest) -> bool:
    return (
        _any_glob(request.namespace, rule.namespaces)
        and _any_glob(request.service_account, rule.service_accounts)
        and any(_subject_mismatch(s, identity) is None for s in rule.subjects)
    )


def _mismatches(rule: Rule, identity: Identity, request: pb.CreateTokenRequest) -> list[str]:
    out = []
    subjects = [_subject_mismatch(s, identity) for s in rule.subjects]
    if None not in subjects:
        details = "; ".join(f"subjects[{i}]: {why}" for i, why in enumerate(subjects))
        out.append(f"no subject matches {identity} ({details})")
    if not _any_glob(request.namespace, rule.namespaces):
        out.append(f"namespace {request.namespace!r} does not match {list(rule.namespaces)!r}")
    if not _any_glob(request.service_account, rule.service_accounts):
        out.append(
            f"service account {request.service_account!r} does not match "
            f"{list(rule.service_accounts)!r}"
        )
    return out


# --- the deciding rule ----------------------------------------------------------------------


def _decide_with(rule: Rule, request: pb.CreateTokenRequest) -> Decision:
    def deny(reason: Reason, message: str) -> Decision:
        return Decision(allowed=False, reason=reason, message=message, rule=rule.name)

    spec = request.token_request.spec
    if request.dry_run and not rule.allow_dry_run:
        return deny(
            Reason.DRY_RUN_NOT_ALLOWED, "dry-run requests are not allowed for this service account"
        )

    bound = rule.bound_object
    kinds = ", ".join(bound.kinds)
    if not spec.HasField("bound_object_ref"):
        if bound.required:
            return deny(
                Reason.BOUND_OBJECT_REQUIRED,
                "tokens for this service account must be bound to an object "
                f"(token_request.spec.bound_object_ref, kind {kinds})",
            )
    elif spec.bound_object_ref.kind not in bound.kinds:
        return deny(
            Reason.BOUND_KIND_NOT_ALLOWED,
            f"tokens for this service account may not be bound to a "
            f"{go_quote(spec.bound_object_ref.kind)} (allowed kinds: {kinds})",
        )

    audiences = tuple(spec.audiences) or rule.default_audiences
    if not audiences and not rule.allow_api_server_audience:
        return deny(
            Reason.AUDIENCE_REQUIRED,
            "an audience is required: tokens for this service account are not issued for the "
            "API server's own audience; set token_request.spec.audiences",
        )
    denied = [a for a in spec.audiences if a not in rule.audiences]
    if denied:
        more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
        return deny(
            Reason.AUDIENCE_NOT_ALLOWED,
            f"audience {go_quote(denied[0])} is not allowed for this service account{more}",
        )

    requested = spec.expiration_seconds if spec.HasField("expiration_seconds") else None
    expiration = requested if requested is not None else rule.default_expiration
    effective = expiration if expiration is not None else SERVER_DEFAULT_EXPIRATION_SECONDS
    granted = effective
    if effective > rule.max_expiration:
        if rule.on_longer_expiration == "reject":
            what = "requested expiration" if requested is not None else "default expiration"
            return deny(
                Reason.EXPIRATION_TOO_LONG,
                f"{what} of {effective} seconds is longer than the maximum of "
                f"{rule.max_expiration} seconds for this service account",
            )
        granted = rule.max_expiration
    if (
        granted == WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS
        and spec.HasField("bound_object_ref")
        and spec.bound_object_ref.kind == "Pod"
        and rule.max_expiration < EXPIRATION_EXTENSION_SECONDS
    ):
        granted -= 1  # not the one length the API server extends to a year
    warnings: tuple[str, ...] = ()
    if granted != effective:
        expiration = granted
        warnings = (f"requested expiration of {effective} seconds shortened to {granted} seconds",)
    return Decision(
        allowed=True,
        reason=ALLOWED,
        message=f"allowed by rule {rule.name}",
        rule=rule.name,
        audiences=audiences,
        expiration_seconds=expiration,
        warnings=warnings,
        cacheable=rule.cache.enabled,
        rate_limit=rule.rate_limit,
        max_expiration_seconds=rule.max_expiration,
    )
