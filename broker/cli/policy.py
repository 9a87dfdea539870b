"""`token-broker policy`: `validate` a policy file, or `explain` its decision for a caller and
request (like `kubectl auth can-i`), offline: no broker, no cluster."""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from broker.cli.flags import (
    EXIT_ERROR,
    EXIT_USAGE,
    UsageError,
    duration_arg,
    token_request_from_args,
)
from broker.identity import AUTH_METHODS, CERTIFICATE_FIELDS, Identity

if TYPE_CHECKING:
    from broker.gen.tokenbroker.v1 import token_broker_pb2 as pb
    from broker.policy import Explanation


EXPLAIN_DESCRIPTION = """\
Would this caller get a token? Evaluates the policy as the broker would (like kubectl auth
can-i) and prints the decision, the deciding rule and the reason, the effective audiences and
expiration, and for every rule why it does or does not match. Exit status: 0 allowed,
1 denied, 2 invalid flags or policy.

The caller is --subject (Identity.name: the key's identity for apiKey, the `sub` for jwt,
the socket's identity for unixSocket; for mtls a certificate with just that name, in --field:
uri (default), dns or cn) with --method (default mtls); or --certificate, a client
certificate (PEM) whose names count as the broker reads them. The report then says which
certificate field each matching subject matched. jwt callers also need --issuer, and
--claim KEY=VALUE per claim (repeat a key for a list claim). The request flags are those of
`token-broker token`.
"""


def add_parser(commands: Any) -> None:
    policy = commands.add_parser(
        "policy",
        help="validate a policy file, or explain its decision for a caller and request",
        description="Check a policy file offline (no broker, no cluster).",
    )
    sub = policy.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    validate = sub.add_parser(
        "validate",
        help="check a policy file (exit 1 with the bad key if invalid)",
        description="Check a policy file: exit 0 with a summary, or 1 naming each bad key. "
        "Warnings (stderr, exit 0) point out rules whose meaning changed, and what to write.",
    )
    validate.add_argument("file", type=Path, metavar="FILE")

    explain = sub.add_parser(
        "explain",
        help="would this caller get this token, and why (like kubectl auth can-i)",
        description=EXPLAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("--policy", type=Path, required=True, metavar="FILE")
    who = explain.add_argument_group("caller")
    who.add_argument("--subject", metavar="NAME", help="the identity's name")
    who.add_argument("--method", choices=AUTH_METHODS, default="mtls", help="(default: mtls)")
    who.add_argument(
        "--field",
        choices=CERTIFICATE_FIELDS,
        help="mtls: the certificate field --subject is (default: uri)",
    )
    who.add_argument(
        "--certificate",
        type=Path,
        metavar="PEM",
        help="mtls: a client certificate (instead of --subject)",
    )
    who.add_argument("--issuer", help="the jwt issuer (iss), exactly")
    who.add_argument(
        "--claim", action="append", default=[], metavar="KEY=VALUE", help="a jwt claim"
    )
    req = explain.add_argument_group("request (as `token-broker token` takes it)")
    req.add_argument("service_account", metavar="SERVICE_ACCOUNT")
    req.add_argument("-n", "--namespace", required=True)
    req.add_argument("--audience", action="append", default=[], help="repeatable")
    req.add_argument(
        "--duration", type=duration_arg, default=Decimal(0), help="10m, 1h; 0: none requested"
    )
    req.add_argument("--bound-object-kind", default="", help="Node, Pod or Secret")
    req.add_argument("--bound-object-name", default="", help="(the policy ignores it)")
    req.add_argument("--bound-object-uid", default="", help=argparse.SUPPRESS)
    req.add_argument(
        "--dry-run", nargs="?", const="server", default="none", choices=["none", "server"]
    )


def identity_from_args(args: argparse.Namespace) -> Identity:
    """The caller of `policy explain`; raises UsageError."""
    if args.certificate is not None:
        return _certificate_caller(args)
    if args.subject is None:
        raise UsageError("--subject or --certificate is required")
    if args.field is not None and args.method != "mtls":
        raise UsageError("--field is only for --method mtls")
    if args.method == "jwt" and not args.issuer:
        raise UsageError("--issuer is required with --method jwt")
    if args.method != "jwt" and (args.issuer or args.claim):
        raise UsageError("--issuer and --claim are only for --method jwt")
    claims: dict[str, Any] = {}
    for item in args.claim:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--claim {item}: expected KEY=VALUE")
        if key not in claims:
            claims[key] = value
        elif isinstance(claims[key], list):
            claims[key].append(value)
        else:
            claims[key] = [claims[key], value]
    return Identity(
        method=args.method,
        name=args.subject,
        issuer=args.issuer,
        claims=MappingProxyType(claims),
        certificate_field=args.field,
    )


def _certificate_caller(args: argparse.Namespace) -> Identity:
    from cryptography import x509

    from broker.authn import certificate_names

    if args.subject is not None or args.field is not None or args.method != "mtls":
        raise UsageError("--certificate is the whole mtls caller: no --subject, --field, --method")
    try:
        certificate = x509.load_pem_x509_certificates(args.certificate.read_bytes())[0]
    except OSError as exc:
        raise UsageError(f"--certificate {args.certificate}: {exc.strerror}") from None
    except ValueError:
        raise UsageError(f"--certificate {args.certificate}: not a PEM certificate") from None
    identity = Identity.from_certificate(certificate_names(certificate))
    if identity is None:
        raise UsageError(
            f"--certificate {args.certificate}: no URI SAN, DNS SAN or CN (the broker refuses it)"
        )
    return identity


def explain_request_from_args(args: argparse.Namespace) -> pb.CreateTokenRequest:
    """The request of `policy explain`, validated as the broker would; raises UsageError."""
    from broker.validation import create_token_violations

    if args.bound_object_kind and not args.bound_object_name:
        args.bound_object_name = "any"  # the policy looks at the kind only
    request = token_request_from_args(args)
    violations = list(create_token_violations(request))
    if violations:
        texts = "; ".join(f"{v.field}: {v.description}" for v in violations)
        raise UsageError(f"the broker would refuse this request before its policy: {texts}")
    return request


def run(args: argparse.Namespace) -> int:
    from broker.policy import Policy, PolicyError

    if args.policy_command == "validate":
        try:
            policy = Policy.load(args.file)
        except PolicyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        count = len(policy.rules)
        for warning in policy.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{args.file}: valid, {count} rule{'' if count == 1 else 's'}")
        return 0
    try:
        identity = identity_from_args(args)
        request = explain_request_from_args(args)
        policy = Policy.load(args.policy)
    except (UsageError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    explanation = policy.explain(identity, request)
    print(format_explanation(explanation, identity, request), end="")
    return 0 if explanation.decision.allowed else EXIT_ERROR


def describe_request(request: pb.CreateTokenRequest) -> str:
    spec = request.token_request.spec
    parts = [
        f"{request.namespace}/{request.service_account}",
        f"audiences {', '.join(spec.audiences) or '(none)'}",
        f"expiration {spec.expiration_seconds}s"
        if spec.HasField("expiration_seconds")
        else "expiration (none)",
    ]
    if spec.HasField("bound_object_ref"):
        parts.append(f"bound to a {spec.bound_object_ref.kind}")
    if request.dry_run:
        parts.append("dry run")
    return ", ".join(parts)


def format_explanation(
    explanation: Explanation, identity: Identity, request: pb.CreateTokenRequest
) -> str:
    """The report of `policy explain`."""
    d = explanation.decision
    lines = [
        "allowed" if d.allowed else "denied",
        f"reason:     {d.reason}",
        f"rule:       {d.rule or '(none matched)'}",
        f"caller:     {identity}",
    ]
    if identity.certificate is not None:
        lines.append(f"certificate: {identity.certificate.describe()}")
    lines += [
        f"request:    {describe_request(request)}",
    ]
    if d.allowed:
        own = "(none: the API server's own)"
        default = "(none: the API server's default, 3600s)"
        lines.append(f"audiences:  {', '.join(d.audiences) or own}")
        lines.append(
            f"expiration: {default if d.expiration_seconds is None else d.expiration_seconds}"
            + ("" if d.expiration_seconds is None else "s")
        )
        lines += [f"warning:    {w}" for w in d.warnings]
    else:
        lines.append(f"message:    {d.message}")
    lines.append("rules:")
    decided = False
    for rule in explanation.rules:
        if rule.deciding:
            state, decided = "matches, decides", True
        elif rule.matched:
            state = "matches, but an earlier rule decides" if decided else "matches"
        else:
            state = "does not match"
        lines.append(f"  [{rule.index}] {rule.name}: {state}")
        lines += [f"        + {how}" for how in rule.subject_matches]
        lines += [f"        - {why}" for why in rule.mismatches]
    if not explanation.rules:
        lines.append("  (none: the policy denies everything)")
    return "\n".join(lines) + "\n"
