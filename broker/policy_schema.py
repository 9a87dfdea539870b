"""The policy file's schema: pydantic models, and errors that name the bad key.

Only the shape and the constraints of single values live here; what a rule means when a
request arrives is `broker.policy`. Keys are camelCase; unknown keys are errors.
"""

from __future__ import annotations

import functools
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.alias_generators import to_camel

from broker.config import RateSettings
from broker.durations import parse_go_duration
from broker.identity import AuthMethod, CertificateField
from broker.spiffe import SpiffePattern, looks_like_spiffe

BoundKind = Literal["Pod", "Secret", "Node"]
BOUND_KINDS: tuple[BoundKind, ...] = ("Pod", "Secret", "Node")
OnLongerExpiration = Literal["cap", "reject"]

# The API server's bounds of spec.expirationSeconds, and its default when none is requested.
MIN_EXPIRATION_SECONDS = 600
MAX_EXPIRATION_SECONDS = 1 << 32
SERVER_DEFAULT_EXPIRATION_SECONDS = 3600
# kube-apiserver's kubelet-style extension (--service-account-extend-token-expiration, on by
# default): a Pod-bound request of exactly this many seconds for its own audiences gets a JWT
# valid for EXPIRATION_EXTENSION_SECONDS, while spec and status still say 3607 s.
WARN_ONLY_BOUND_TOKEN_EXPIRATION_SECONDS = 3607
EXPIRATION_EXTENSION_SECONDS = 365 * 24 * 60 * 60

_RULE_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
RULE_NAME_MAX_LENGTH = 128
_ITEM_PREFIX = re.compile(r"\[([0-9]+)\] ")


class PolicyError(Exception):
    """A policy file cannot be read or is invalid; the message names the bad key."""


def _duration_seconds(value: object) -> object:
    """Integer seconds, or a Go/Kubernetes duration string ("10m", "1h30m", "90s")."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a string such as 10m or 1h, or integer seconds")
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        if seconds != seconds.to_integral_value():
            raise ValueError(f'duration "{value}" is not a whole number of seconds')
        return int(seconds)
    return value


def _list(value: object) -> object:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a list")
    return value


def _globs(value: object) -> object:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list | tuple):
        raise ValueError("must be a glob (a string) or a list of globs")
    return value


def _non_empty(value: tuple[Any, ...]) -> tuple[Any, ...]:
    # An after-validator: not reported when the items themselves are invalid.
    if not value:
        raise ValueError("must list at least one")
    return value


# Whole seconds, > 0; bounds that depend on the key are checked by the fields.
Duration = Annotated[int, BeforeValidator(_duration_seconds), Field(gt=0)]
Text = Annotated[str, Field(min_length=1)]
Glob = Text
# Lists: YAML sequences (a bare string is an error, except for claim globs).
Texts = Annotated[tuple[Text, ...], BeforeValidator(_list)]
Globs = Annotated[tuple[Glob, ...], BeforeValidator(_list), AfterValidator(_non_empty)]
ClaimGlobs = Annotated[tuple[Glob, ...], BeforeValidator(_globs), AfterValidator(_non_empty)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class Subject(_Model):
    """Who a rule is for: an auth method and a glob on `Identity.name` (and, for jwt, more).

    mtls subjects match one field of the client certificate: `field` (default uri: the URI
    SAN); dns and cn only when written. A `name` with the spiffe scheme is a SPIFFE ID
    pattern (broker.spiffe), validated here and matched only against a URI SAN that is a
    valid SPIFFE ID.
    """

    method: AuthMethod
    # Before `name`, whose check reads it. mtls only.
    field: CertificateField | None = None
    name: Glob
    # Exact issuer (`iss`): required for jwt subjects, not allowed for the others.
    issuer: str | None = Field(default=None, validate_default=True)
    # Top-level claim name -> glob(s); every listed claim must match (jwt only).
    claims: dict[str, ClaimGlobs] = Field(default_factory=dict)

    @field_validator("field")
    @classmethod
    def _field_for_mtls(cls, value: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if value is not None and method is not None and method != "mtls":
            raise ValueError(f"only mtls subjects have a certificate field, not {method} subjects")
        return value

    @field_validator("name")
    @classmethod
    def _spiffe_pattern(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("method") != "mtls" or not looks_like_spiffe(value):
            return value
        field = info.data.get("field")
        if field in ("dns", "cn"):
            raise ValueError(
                f"{value!r} is a SPIFFE ID pattern: only a URI SAN holds a SPIFFE ID, so it "
                f"cannot match field {field}"
            )
        SpiffePattern.parse(value)  # ValueError naming the problem
        return value

    @functools.cached_property
    def certificate_field(self) -> CertificateField:
        """The certificate field an mtls subject matches."""
        return self.field or "uri"

    @functools.cached_property
    def spiffe_pattern(self) -> SpiffePattern | None:
        """The SPIFFE ID pattern of an mtls subject whose name has the spiffe scheme."""
        if self.method != "mtls" or not looks_like_spiffe(self.name):
            return None
        return SpiffePattern.parse(self.name)

    @field_validator("issuer")
    @classmethod
    def _issuer_for_jwt(cls, value: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if method == "jwt" and not value:
            raise ValueError("required for jwt subjects (the exact `iss` of the tokens)")
        if method is not None and method != "jwt" and value is not None:
            raise ValueError(f"only jwt subjects have an issuer, not {method} subjects")
        return value

    @field_validator("claims")
    @classmethod
    def _claims_for_jwt(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if value and method is not None and method != "jwt":
            raise ValueError(f"only jwt subjects have claims, not {method} subjects")
        return value


Subjects = Annotated[tuple[Subject, ...], BeforeValidator(_list), AfterValidator(_non_empty)]
Kinds = Annotated[tuple[BoundKind, ...], BeforeValidator(_list), AfterValidator(_non_empty)]


class BoundObject(_Model):
    """Whether tokens must be bound to an object, and to which kinds they may be."""

    required: StrictBool = False
    kinds: Kinds = BOUND_KINDS


class RuleCache(_Model):
    """Whether the broker's token cache (broker.cache) may serve this rule's tokens."""

    # false: every request is a fresh TokenRequest (e.g. callers that need a new `jti` each time).
    enabled: StrictBool = True


class RuleRateLimit(_Model):
    """Rate limits for the requests this rule decides, replacing `rateLimit.perCaller` /
    `perServiceAccount` of the settings (broker.ratelimit). A key left out keeps the
    default; `null` means no limit in that scope for this rule. The global limit still
    applies. The rule's limits count in buckets of their own (per rule)."""

    per_caller: RateSettings | None = None
    per_service_account: RateSettings | None = None

    def overrides(self, field: str) -> bool:
        """Whether the rule sets `field` (`per_caller`, `per_service_account`), to null or not."""
        return field in self.model_fields_set


class Rule(_Model):
    name: str
    subjects: Subjects
    namespaces: Globs
    service_accounts: Globs
    # Exact audiences a caller may ask for.
    audiences: Texts = ()
    # Used when the request names no audience; each must be in `audiences`.
    default_audiences: Texts = ()
    # An audience-less request for the API server's own audience is refused unless this is set.
    allow_api_server_audience: StrictBool = False
    max_expiration: Duration = SERVER_DEFAULT_EXPIRATION_SECONDS
    default_expiration: Duration | None = None
    on_longer_expiration: OnLongerExpiration = "cap"
    bound_object: BoundObject = BoundObject()
    allow_dry_run: StrictBool = False
    cache: RuleCache = RuleCache()
    rate_limit: RuleRateLimit | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > RULE_NAME_MAX_LENGTH or not _RULE_NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a rule name: letters, digits, '.', '_' or '-', starting and "
                f"ending with a letter or digit, at most {RULE_NAME_MAX_LENGTH} characters"
            )
        return value

    @field_validator("default_audiences")
    @classmethod
    def _defaults_allowed(cls, value: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        allowed = info.data.get("audiences")
        if allowed is None:
            return value  # `audiences` itself is invalid and reported
        for i, audience in enumerate(value):
            if audience not in allowed:
                raise ValueError(f"[{i}] {audience!r} is not in audiences")
        return value

    @field_validator("max_expiration")
    @classmethod
    def _max_bounds(cls, value: int) -> int:
        _check_bounds(value)
        return value

    @field_validator("default_expiration")
    @classmethod
    def _default_bounds(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:
            return value
        _check_bounds(value)
        maximum = info.data.get("max_expiration")
        if maximum is not None and value > maximum:
            raise ValueError(f"{value}s is longer than maxExpiration ({maximum}s)")
        return value


def _check_bounds(seconds: int) -> None:
    if seconds < MIN_EXPIRATION_SECONDS:
        raise ValueError(f"{seconds}s is less than the API server's minimum of 10m (600s)")
    if seconds > MAX_EXPIRATION_SECONDS:
        raise ValueError(f"{seconds}s is more than the API server's maximum of 2^32 seconds")


class PolicyDocument(_Model):
    rules: Annotated[tuple[Rule, ...], BeforeValidator(_list)]


def parse_document(data: object, source: str) -> PolicyDocument:
    """Validate the file's content; PolicyError lists every problem, each naming its key."""
    try:
        doc = PolicyDocument.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format(source, [_error_line(err) for err in exc.errors()])) from None
    problems = []
    first_index: dict[str, int] = {}
    for i, rule in enumerate(doc.rules):
        if rule.name in first_index:
            problems.append(
                f"rules[{i}].name: duplicate rule name {rule.name!r} "
                f"(also rules[{first_index[rule.name]}])"
            )
        first_index.setdefault(rule.name, i)
    if problems:
        raise PolicyError(_format(source, problems))
    return doc


def _format(source: str, lines: list[str]) -> str:
    if len(lines) == 1:
        return f"invalid policy {source}: {lines[0]}"
    return "\n  ".join([f"invalid policy {source}:", *lines])


def key_path(loc: tuple[int | str, ...]) -> str:
    """("rules", 2, "maxExpiration") -> "rules[2].maxExpiration"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


def _error_line(err: Any) -> str:
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = tuple(err["loc"])
    if err["type"] == "missing":
        msg = "required"
    elif match := _ITEM_PREFIX.match(msg):
        # A validator naming an item of its list field: `defaultAudiences[1]: ...`.
        loc += (int(match.group(1)),)
        msg = msg[match.end() :]
    return f"{key_path(loc)}: {msg}"
