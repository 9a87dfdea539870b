"""The emulator's objects: namespaces, service accounts, pods, secrets and nodes.

Only what the TokenRequest handler reads is modelled: names, UIDs, a pod's service account and
node. Objects are immutable snapshots; "recreating" an object gives it a new UID, which is
exactly what rule 7 (the bound-object UID conflict) detects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class ObjectNotFound(KeyError):
    """The object (or its namespace) does not exist. `resource` is the plural resource name."""

    def __init__(self, resource: str, name: str) -> None:
        super().__init__(f"{resource} {name!r} not found")
        self.resource = resource
        self.name = name


class ObjectExists(ValueError):
    """An object with that name already exists."""

    def __init__(self, resource: str, name: str) -> None:
        super().__init__(f"{resource} {name!r} already exists")
        self.resource = resource
        self.name = name


def rfc3339(moment: datetime) -> str:
    """metav1.Time's JSON form: UTC, whole seconds, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StoredObject:
    name: str
    uid: str
    resource_version: int
    created: datetime

    def _metadata(self, namespace: str | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name}
        if namespace is not None:
            meta["namespace"] = namespace
        meta["uid"] = self.uid
        meta["resourceVersion"] = str(self.resource_version)
        meta["creationTimestamp"] = rfc3339(self.created)
        return meta


@dataclass(frozen=True)
class Namespace(StoredObject):
    def to_json(self) -> dict[str, Any]:
        meta = self._metadata()
        meta["labels"] = {"kubernetes.io/metadata.name": self.name}
        return {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": meta,
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }


@dataclass(frozen=True)
class ServiceAccount(StoredObject):
    namespace: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "ServiceAccount",
            "apiVersion": "v1",
            "metadata": self._metadata(self.namespace),
        }


@dataclass(frozen=True)
class Pod(StoredObject):
    namespace: str = ""
    service_account_name: str = "default"
    node_name: str = ""

    def to_json(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "containers": [],
            "serviceAccountName": self.service_account_name,
            # The deprecated alias the apiserver still fills in.
            "serviceAccount": self.service_account_name,
        }
        if self.node_name:
            spec["nodeName"] = self.node_name
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": self._metadata(self.namespace),
            "spec": spec,
            "status": {"phase": "Running" if self.node_name else "Pending"},
        }


@dataclass(frozen=True)
class Secret(StoredObject):
    namespace: str = ""
    type: str = "Opaque"

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "Secret",
            "apiVersion": "v1",
            "metadata": self._metadata(self.namespace),
            "type": self.type,
        }


@dataclass(frozen=True)
class Node(StoredObject):
    def to_json(self) -> dict[str, Any]:
        return {"kind": "Node", "apiVersion": "v1", "metadata": self._metadata(), "spec": {}}


@dataclass
class _NamespaceContents:
    namespace: Namespace
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    secrets: dict[str, Secret] = field(default_factory=dict)


class ObjectStore:
    """In-memory objects, mutated from the event loop's thread (tests and HTTP handlers)."""

    def __init__(self) -> None:
        self._namespaces: dict[str, _NamespaceContents] = {}
        self._nodes: dict[str, Node] = {}
        self._version = 0

    # --- helpers --------------------------------------------------------------------------

    def _meta(self, name: str, uid: str | None) -> dict[str, Any]:
        return {
            "name": name,
            "uid": uid or str(uuid.uuid4()),
            "resource_version": self._bump(),
            "created": datetime.now(UTC).replace(microsecond=0),
        }

    def _ns(self, namespace: str) -> _NamespaceContents:
        try:
            return self._namespaces[namespace]
        except KeyError:
            raise ObjectNotFound("namespaces", namespace) from None

    def _bump(self) -> int:
        self._version += 1
        return self._version

    @property
    def resource_version(self) -> int:
        """The latest resource version handed out (list metadata)."""
        return self._version

    # --- namespaces -----------------------------------------------------------------------

    def create_namespace(self, name: str, *, uid: str | None = None) -> str:
        if name in self._namespaces:
            raise ObjectExists("namespaces", name)
        ns = Namespace(**self._meta(name, uid))
        self._namespaces[name] = _NamespaceContents(ns)
        return ns.uid

    def get_namespace(self, name: str) -> Namespace:
        return self._ns(name).namespace

    def has_namespace(self, name: str) -> bool:
        return name in self._namespaces

    def list_namespaces(self) -> list[Namespace]:
        return [c.namespace for c in self._namespaces.values()]

    def delete_namespace(self, name: str) -> Namespace:
        """Delete a namespace and, at once, everything in it (no Terminating phase)."""
        contents = self._ns(name)
        del self._namespaces[name]
        self._bump()
        return contents.namespace

    # --- service accounts -----------------------------------------------------------------

    def create_service_account(self, namespace: str, name: str, *, uid: str | None = None) -> str:
        contents = self._ns(namespace)
        if name in contents.service_accounts:
            raise ObjectExists("serviceaccounts", name)
        sa = ServiceAccount(**self._meta(name, uid), namespace=namespace)
        contents.service_accounts[name] = sa
        return sa.uid

    def get_service_account(self, namespace: str, name: str) -> ServiceAccount:
        contents = self._namespaces.get(namespace)
        if contents is None or name not in contents.service_accounts:
            raise ObjectNotFound("serviceaccounts", name)
        return contents.service_accounts[name]

    def list_service_accounts(self, namespace: str | None = None) -> list[ServiceAccount]:
        return [sa for c in self._scan(namespace) for sa in c.service_accounts.values()]

    def delete_service_account(self, namespace: str, name: str) -> ServiceAccount:
        sa = self.get_service_account(namespace, name)
        del self._namespaces[namespace].service_accounts[name]
        self._bump()
        return sa

    # --- pods -----------------------------------------------------------------------------

    def create_pod(
        self,
        namespace: str,
        name: str,
        service_account_name: str = "default",
        node_name: str | None = None,
        *,
        uid: str | None = None,
    ) -> str:
        contents = self._ns(namespace)
        if name in contents.pods:
            raise ObjectExists("pods", name)
        pod = Pod(
            **self._meta(name, uid),
            namespace=namespace,
            service_account_name=service_account_name,
            node_name=node_name or "",
        )
        contents.pods[name] = pod
        return pod.uid

    def get_pod(self, namespace: str, name: str) -> Pod:
        contents = self._namespaces.get(namespace)
        if contents is None or name not in contents.pods:
            raise ObjectNotFound("pods", name)
        return contents.pods[name]

    def list_pods(self, namespace: str | None = None) -> list[Pod]:
        return [p for c in self._scan(namespace) for p in c.pods.values()]

    def delete_pod(self, namespace: str, name: str) -> Pod:
        """Delete at once, as if with a zero grace period and no kubelet to wait for."""
        pod = self.get_pod(namespace, name)
        del self._namespaces[namespace].pods[name]
        self._bump()
        return pod

    # --- secrets --------------------------------------------------------------------------

    def create_secret(
        self, namespace: str, name: str, *, type: str = "Opaque", uid: str | None = None
    ) -> str:
        contents = self._ns(namespace)
        if name in contents.secrets:
            raise ObjectExists("secrets", name)
        secret = Secret(**self._meta(name, uid), namespace=namespace, type=type)
        contents.secrets[name] = secret
        return secret.uid

    def get_secret(self, namespace: str, name: str) -> Secret:
        contents = self._namespaces.get(namespace)
        if contents is None or name not in contents.secrets:
            raise ObjectNotFound("secrets", name)
        return contents.secrets[name]

    def list_secrets(self, namespace: str | None = None) -> list[Secret]:
        return [s for c in self._scan(namespace) for s in c.secrets.values()]

    def delete_secret(self, namespace: str, name: str) -> Secret:
        secret = self.get_secret(namespace, name)
        del self._namespaces[namespace].secrets[name]
        self._bump()
        return secret

    # --- nodes ----------------------------------------------------------------------------

    def create_node(self, name: str, *, uid: str | None = None) -> str:
        if name in self._nodes:
            raise ObjectExists("nodes", name)
        node = Node(**self._meta(name, uid))
        self._nodes[name] = node
        return node.uid

    def get_node(self, name: str) -> Node:
        try:
            return self._nodes[name]
        except KeyError:
            raise ObjectNotFound("nodes", name) from None

    def list_nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def delete_node(self, name: str) -> Node:
        node = self.get_node(name)
        del self._nodes[name]
        self._bump()
        return node

    # --- iteration ------------------------------------------------------------------------

    def _scan(self, namespace: str | None) -> Iterator[_NamespaceContents]:
        if namespace is None:
            yield from self._namespaces.values()
        elif namespace in self._namespaces:
            yield self._namespaces[namespace]
