"""Authentication (bearer tokens) and a small RBAC-like authorizer.

A user is a bearer token mapped to a name and groups, or a service-account JWT this API server
issued itself (`ServiceAccountTokenAuthenticator`). Grants say which verbs a user (or group)
may use on which resources, in which namespaces, optionally only for some object names. Admin
users, and members of `system:masters`, may do everything, as cluster-admin may.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ALL = "*"
ADMIN_GROUP = "system:masters"
TOKEN_RESOURCE = "serviceaccounts/token"


@dataclass(frozen=True)
class UserInfo:
    name: str
    groups: tuple[str, ...] = ()
    admin: bool = False

    @property
    def is_admin(self) -> bool:
        return self.admin or ADMIN_GROUP in self.groups

    def __repr__(self) -> str:  # no credential is held here; keep reprs short anyway
        return f"UserInfo(name={self.name!r}, groups={self.groups!r}, admin={self.is_admin})"


@dataclass(frozen=True)
class Grant:
    """Allows `verbs` on `resources` ("pods", "serviceaccounts/token", or "*")."""

    namespaces: frozenset[str]  # "*" = every namespace and cluster-scoped resources
    resources: frozenset[str]
    verbs: frozenset[str]
    resource_names: frozenset[str]  # empty = every name
    user: str | None = None
    group: str | None = None

    def matches(self, user: UserInfo, verb: str, resource: str, namespace: str, name: str) -> bool:
        if self.user is not None and self.user != user.name:
            return False
        if self.group is not None and self.group not in user.groups:
            return False
        if ALL not in self.namespaces and namespace not in self.namespaces:
            return False
        if ALL not in self.resources and resource not in self.resources:
            return False
        if ALL not in self.verbs and verb not in self.verbs:
            return False
        return not self.resource_names or name in self.resource_names


def _implicit_groups(name: str, groups: Iterable[str]) -> tuple[str, ...]:
    """The groups the apiserver adds: service accounts' own, and system:authenticated."""
    out = list(groups)
    if name.startswith("system:serviceaccount:"):
        namespace = name.split(":")[2]
        out += ["system:serviceaccounts", f"system:serviceaccounts:{namespace}"]
    out.append("system:authenticated")
    return tuple(dict.fromkeys(out))


class AccessControl:
    def __init__(self) -> None:
        self._users: dict[str, UserInfo] = {}
        self._grants: list[Grant] = []

    # --- users ----------------------------------------------------------------------------

    def add_user(
        self, token: str, name: str, groups: Iterable[str] = (), *, admin: bool = False
    ) -> UserInfo:
        if not token:
            raise ValueError("a user needs a non-empty token")
        user = UserInfo(name, _implicit_groups(name, groups), admin)
        self._users[token] = user
        return user

    def remove_user(self, token: str) -> None:
        """Forget a bearer token; later requests with it get 401. Unknown tokens are ignored."""
        self._users.pop(token, None)

    def first_token(self) -> str | None:
        return next(iter(self._users), None)

    def first_admin_token(self) -> str | None:
        """The bearer token of the first admin user (`admin`, or in system:masters)."""
        return next((token for token, user in self._users.items() if user.is_admin), None)

    def user_of(self, token: str) -> UserInfo | None:
        return self._users.get(token)

    def authenticate(self, authorization: str | None) -> UserInfo | None:
        """The user of an `Authorization: Bearer <token>` header, or None (401)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        return self._users.get(token.strip())

    # --- grants ---------------------------------------------------------------------------

    def allow(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        namespaces: Iterable[str] = (ALL,),
        resources: Iterable[str] = (TOKEN_RESOURCE,),
        verbs: Iterable[str] = ("create",),
        resource_names: Iterable[str] = (),
    ) -> None:
        if (user is None) == (group is None):
            raise ValueError("a grant names exactly one of user or group")
        self._grants.append(
            Grant(
                namespaces=frozenset(namespaces),
                resources=frozenset(resources),
                verbs=frozenset(verbs),
                resource_names=frozenset(resource_names),
                user=user,
                group=group,
            )
        )

    def revoke(self, *, user: str | None = None, group: str | None = None) -> None:
        """Drop every grant of that user (or group)."""
        self._grants = [g for g in self._grants if not (g.user == user and g.group == group)]

    def namespaces_allowed(self, user: UserInfo, verb: str, resource: str) -> frozenset[str]:
        """The namespaces where `user` may `verb` `resource` (for some name at least);
        {"*"}: every namespace."""
        if user.is_admin:
            return frozenset({ALL})
        out: set[str] = set()
        for grant in self._grants:
            # Asked about one of its own namespaces and names, a grant answers for who, which
            # resource and which verb only.
            namespace = next(iter(grant.namespaces))
            name = next(iter(grant.resource_names), "")
            if grant.matches(user, verb, resource, namespace, name):
                out |= grant.namespaces
        return frozenset(out)

    def authorize(
        self, user: UserInfo, verb: str, resource: str, namespace: str = "", name: str = ""
    ) -> bool:
        if user.is_admin:
            return True
        return any(g.matches(user, verb, resource, namespace, name) for g in self._grants)


# go-jose's jwt.DefaultLeeway, which kube-apiserver's Validate uses for exp/nbf/iat.
SERVICE_ACCOUNT_TOKEN_LEEWAY_SECONDS = 60


class ObjectGone(Exception):
    """A service account or bound object named by a token no longer exists (or its UID
    changed): the token is invalid (kube-apiserver's validator says the same)."""


class ServiceAccountTokenAuthenticator:
    """Bearer JWTs this API server signed: kube-apiserver's service-account token
    authenticator (`pkg/serviceaccount/jwt.go`, `claims.go`).

    Valid when the signature verifies with the API server's key, `iss` is its issuer, `aud`
    includes one of its API audiences, and `exp`/`nbf` hold (60 s leeway); then the objects the
    private claims name must still exist with the same UIDs (`lookup`: the service account,
    and the pod or secret a token is bound to). The user is
    `system:serviceaccount:<namespace>:<name>` in `system:serviceaccounts`,
    `system:serviceaccounts:<namespace>` and `system:authenticated`.
    """

    def __init__(
        self,
        *,
        public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
        algorithm: str,
        issuer: str,
        audiences: Sequence[str],
        lookup: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """`lookup(claims)` raises ObjectGone when a named object is gone."""
        self._key = public_key
        self._algorithm = algorithm
        self._issuer = issuer
        self._audiences = frozenset(audiences)
        self._lookup = lookup

    def __repr__(self) -> str:
        return f"ServiceAccountTokenAuthenticator(issuer={self._issuer!r})"

    def authenticate(self, authorization: str | None) -> UserInfo | None:
        """The service account of an `Authorization: Bearer <jwt>` header, or None (401)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or token.count(".") != 2:
            return None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                issuer=self._issuer,
                leeway=SERVICE_ACCOUNT_TOKEN_LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "sub", "aud"], "verify_aud": False},
            )
        except jwt.PyJWTError:
            return None
        audiences = claims.get("aud")
        if isinstance(audiences, str):
            audiences = [audiences]
        if not isinstance(audiences, list) or not self._audiences.intersection(audiences):
            return None
        private = claims.get("kubernetes.io")
        if not isinstance(private, dict):
            return None
        namespace = private.get("namespace")
        account = private.get("serviceaccount")
        if not isinstance(namespace, str) or not isinstance(account, dict):
            return None
        name = f"system:serviceaccount:{namespace}:{account.get('name')}"
        if claims.get("sub") != name:
            return None
        if self._lookup is not None:
            try:
                self._lookup(claims)
            except ObjectGone:
                return None
        return UserInfo(name, _implicit_groups(name, ()))
