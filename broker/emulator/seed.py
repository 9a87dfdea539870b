"""The seed: objects, users and grants the emulator starts with (YAML, JSON or a dict).

```yaml
namespaces:
  - name: demo
    uid: "..."                       # optional, every uid: generated (uuid4) when absent
    serviceAccounts: [{name: build-robot}]
    pods: [{name: web-0, serviceAccountName: build-robot, nodeName: node-1}]
    secrets: [{name: s1, type: Opaque}]
nodes: [{name: node-1}]
users:                               # bearer token -> identity
  - {token: t, name: "system:serviceaccount:token-broker:token-broker", groups: [], admin: false}
rbac:                                # who may do what where
  - {user: "...", namespaces: [demo], resourceNames: []}
    # group: instead of user; namespaces ["*"] = everywhere; resourceNames [] = every name;
    # resources default [serviceaccounts/token], verbs default [create]
```
Unknown keys are rejected, names are checked as Kubernetes would, duplicates refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.emulator.auth import ALL, TOKEN_RESOURCE, AccessControl
from broker.emulator.store import ObjectStore

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


class SeedError(ValueError):
    """The seed is malformed; the message says where."""


def _label(value: str) -> str:
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise ValueError(f"{value!r} is not a DNS-1123 label")
    return value


def _subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise ValueError(f"{value!r} is not a DNS-1123 subdomain")
    return value


Label = Annotated[str, AfterValidator(_label)]
Subdomain = Annotated[str, AfterValidator(_subdomain)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class NamedSeed(_Model):
    name: Subdomain
    uid: str | None = None


class PodSeed(_Model):
    name: Subdomain
    uid: str | None = None
    service_account_name: Subdomain = Field("default", alias="serviceAccountName")
    node_name: Subdomain | None = Field(None, alias="nodeName")


class SecretSeed(_Model):
    name: Subdomain
    uid: str | None = None
    type: str = "Opaque"


class NamespaceSeed(_Model):
    name: Label
    uid: str | None = None
    service_accounts: list[NamedSeed] = Field(default_factory=list, alias="serviceAccounts")
    pods: list[PodSeed] = Field(default_factory=list)
    secrets: list[SecretSeed] = Field(default_factory=list)


class UserSeed(_Model):
    token: str = Field(min_length=1)
    name: str = Field(min_length=1)
    groups: list[str] = Field(default_factory=list)
    admin: bool = False


class GrantSeed(_Model):
    user: str | None = None
    group: str | None = None
    namespaces: list[str] = Field(min_length=1)
    resource_names: list[str] = Field(default_factory=list, alias="resourceNames")
    resources: list[str] = Field(default_factory=lambda: [TOKEN_RESOURCE], min_length=1)
    verbs: list[str] = Field(default_factory=lambda: ["create"], min_length=1)

    @model_validator(mode="after")
    def _one_subject(self) -> GrantSeed:
        if (self.user is None) == (self.group is None):
            raise ValueError("a grant names exactly one of user or group")
        return self


class Seed(_Model):
    namespaces: list[NamespaceSeed] = Field(default_factory=list)
    nodes: list[NamedSeed] = Field(default_factory=list)
    users: list[UserSeed] = Field(default_factory=list)
    rbac: list[GrantSeed] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Seed:
        _no_duplicates("namespaces", [n.name for n in self.namespaces])
        _no_duplicates("nodes", [n.name for n in self.nodes])
        _no_duplicates("users (tokens)", [u.token for u in self.users])
        for ns in self.namespaces:
            _no_duplicates(f"{ns.name}: serviceAccounts", [s.name for s in ns.service_accounts])
            _no_duplicates(f"{ns.name}: pods", [p.name for p in ns.pods])
            _no_duplicates(f"{ns.name}: secrets", [s.name for s in ns.secrets])
        return self


def _no_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate in {what}: {name!r}")
        seen.add(name)


def load_seed(source: Mapping[str, Any] | str | Path | None) -> Seed:
    """Parse and validate a seed: a mapping, a path to a YAML/JSON file, or None (empty)."""
    if source is None:
        return Seed()
    data: Any
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise SeedError(f"cannot read seed file {path}: {err}") from err
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as err:
            raise SeedError(f"seed file {path} is not valid YAML/JSON: {err}") from err
        data = {} if data is None else data
    else:
        data = source
    if not isinstance(data, Mapping):
        raise SeedError("a seed is a mapping with namespaces, nodes, users and rbac")
    try:
        return Seed.model_validate(dict(data))
    except ValidationError as err:
        raise SeedError(f"invalid seed: {err}") from err


def apply_seed(seed: Seed, store: ObjectStore, access: AccessControl) -> None:
    """Create the seed's objects, users and grants."""
    for node in seed.nodes:
        store.create_node(node.name, uid=node.uid)
    for ns in seed.namespaces:
        store.create_namespace(ns.name, uid=ns.uid)
        for sa in ns.service_accounts:
            store.create_service_account(ns.name, sa.name, uid=sa.uid)
        for pod in ns.pods:
            store.create_pod(
                ns.name, pod.name, pod.service_account_name, pod.node_name, uid=pod.uid
            )
        for secret in ns.secrets:
            store.create_secret(ns.name, secret.name, type=secret.type, uid=secret.uid)
    for user in seed.users:
        access.add_user(user.token, user.name, user.groups, admin=user.admin)
    for grant in seed.rbac:
        access.allow(
            user=grant.user,
            group=grant.group,
            namespaces=grant.namespaces or [ALL],
            resources=grant.resources,
            verbs=grant.verbs,
            resource_names=grant.resource_names,
        )
