"""Authentication (bearer tokens) and a small RBAC-like authorizer.

A user is a bearer token mapped to a name and groups. Grants say which verbs a user (or group)
may use on which resources, in which namespaces, optionally only for some object names. Admin
users, and members of `system:masters`, may do everything, as cluster-admin may.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

    def authorize(
        self, user: UserInfo, verb: str, resource: str, namespace: str = "", name: str = ""
    ) -> bool:
        if user.is_admin:
            return True
        return any(g.matches(user, verb, resource, namespace, name) for g in self._grants)
