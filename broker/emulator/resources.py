"""Core REST paths for the objects the token handler reads (for emulators in a subprocess).

GET (get, list), POST (create) and DELETE on namespaces, nodes, and namespaced pods,
serviceaccounts and secrets, with Kubernetes JSON objects and Status errors. Authorization is
the same grant model as the token endpoint (admin users may do everything). Simplified:
deletion is immediate (no grace period, no Terminating namespaces) and answers a Success
Status; only names, UIDs, a pod's service account and node are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiohttp import web

from broker.apiserver import status
from broker.apiserver.status import NAMESPACE_MISMATCH
from broker.emulator.auth import AccessControl, UserInfo
from broker.emulator.store import ObjectExists, ObjectNotFound, ObjectStore

Handler = Callable[[web.Request, UserInfo], Awaitable[tuple[int, dict[str, Any]]]]

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


@dataclass(frozen=True)
class _Kind:
    resource: str
    kind: str
    singular: str
    namespaced: bool
    short_names: tuple[str, ...] = ()


_KINDS = {
    k.resource: k
    for k in (
        _Kind("namespaces", "Namespace", "namespace", False, ("ns",)),
        _Kind("nodes", "Node", "node", False, ("no",)),
        _Kind("pods", "Pod", "pod", True, ("po",)),
        _Kind("secrets", "Secret", "secret", True),
        _Kind("serviceaccounts", "ServiceAccount", "serviceaccount", True, ("sa",)),
    )
}
_VERBS = {
    ("GET", False): "get",
    ("DELETE", False): "delete",
    ("GET", True): "list",
    ("POST", True): "create",
}


class ResourceApi:
    def __init__(self, store: ObjectStore, access: AccessControl) -> None:
        self._store = store
        self._access = access

    def discovery(self) -> dict[str, Any]:
        """GET /api/v1: the APIResourceList of what is served here."""
        resources: list[dict[str, Any]] = []
        for kind in _KINDS.values():
            entry: dict[str, Any] = {
                "name": kind.resource,
                "singularName": kind.singular,
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": ["create", "delete", "get", "list"],
            }
            if kind.short_names:
                entry["shortNames"] = list(kind.short_names)
            resources.append(entry)
        resources.append(
            {
                "name": "serviceaccounts/token",
                "singularName": "",
                "namespaced": True,
                "group": "authentication.k8s.io",
                "version": "v1",
                "kind": "TokenRequest",
                "verbs": ["create"],
            }
        )
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}

    def route(self, method: str, path: str) -> Handler | None:
        """The handler for a core REST path, or None when the path is not one."""
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "v1"] or len(parts) < 3 or "" in parts:
            return None
        rest = parts[2:]
        namespace, name = "", ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 2 or rest[0] not in _KINDS:
            return None
        kind = _KINDS[rest[0]]
        if len(rest) == 2:
            name = rest[1]
        if namespace and not kind.namespaced:
            return None
        if name and kind.namespaced and not namespace:
            return None  # e.g. /api/v1/pods/x does not exist
        collection = not name
        verb = _VERBS.get((method, collection))
        if verb is None:
            return partial(self._method_not_allowed)
        if verb == "create" and kind.namespaced and not namespace:
            return partial(self._method_not_allowed)
        return partial(self._handle, verb, kind, namespace, name)

    async def _method_not_allowed(
        self, request: web.Request, user: UserInfo
    ) -> tuple[int, dict[str, Any]]:
        raise status.method_not_allowed()

    async def _handle(
        self,
        verb: str,
        kind: _Kind,
        namespace: str,
        name: str,
        request: web.Request,
        user: UserInfo,
    ) -> tuple[int, dict[str, Any]]:
        if not self._access.authorize(user, verb, kind.resource, namespace, name):
            reason = status.forbidden_message(
                user.name, verb, resource=kind.resource, namespace=namespace
            )
            raise status.forbidden(kind.resource, name, reason)
        try:
            if verb == "get":
                return 200, self._get(kind, namespace, name).to_json()
            if verb == "list":
                return 200, self._list(kind, namespace)
            if verb == "delete":
                return 200, self._delete(kind, namespace, name)
            return 201, await self._create(kind, namespace, request)
        except ObjectNotFound as err:
            raise status.not_found(err.resource, err.name) from None
        except ObjectExists as err:
            raise status.already_exists(err.resource, err.name) from None

    def _get(self, kind: _Kind, namespace: str, name: str) -> Any:
        store = self._store
        getters: dict[str, Callable[[], Any]] = {
            "namespaces": lambda: store.get_namespace(name),
            "nodes": lambda: store.get_node(name),
            "pods": lambda: store.get_pod(namespace, name),
            "secrets": lambda: store.get_secret(namespace, name),
            "serviceaccounts": lambda: store.get_service_account(namespace, name),
        }
        return getters[kind.resource]()

    def _list(self, kind: _Kind, namespace: str) -> dict[str, Any]:
        store = self._store
        scope = namespace or None
        listers: dict[str, Callable[[], list[Any]]] = {
            "namespaces": store.list_namespaces,
            "nodes": store.list_nodes,
            "pods": lambda: store.list_pods(scope),
            "secrets": lambda: store.list_secrets(scope),
            "serviceaccounts": lambda: store.list_service_accounts(scope),
        }
        items = []
        for obj in listers[kind.resource]():
            item = obj.to_json()
            item.pop("kind", None)
            item.pop("apiVersion", None)
            items.append(item)
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(store.resource_version)},
            "items": items,
        }

    def _delete(self, kind: _Kind, namespace: str, name: str) -> dict[str, Any]:
        store = self._store
        deleters: dict[str, Callable[[], Any]] = {
            "namespaces": lambda: store.delete_namespace(name),
            "nodes": lambda: store.delete_node(name),
            "pods": lambda: store.delete_pod(namespace, name),
            "secrets": lambda: store.delete_secret(namespace, name),
            "serviceaccounts": lambda: store.delete_service_account(namespace, name),
        }
        obj = deleters[kind.resource]()
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": obj.name, "kind": kind.resource, "uid": obj.uid},
        }

    async def _create(self, kind: _Kind, namespace: str, request: web.Request) -> dict[str, Any]:
        data = await request.read()
        try:
            body = json.loads(data)
        except ValueError:
            raise status.bad_request(
                f"the object provided is unrecognized (must be of type {kind.kind}): "
                "couldn't get version/kind; json parse error: invalid JSON"
            ) from None
        if not isinstance(body, dict):
            raise status.bad_request(
                f"the object provided is unrecognized (must be of type {kind.kind}): "
                "the body is not a JSON object"
            )
        metadata = body.get("metadata") or {}
        spec = body.get("spec") or {}
        if not isinstance(metadata, dict) or not isinstance(spec, dict):
            raise status.bad_request(
                f'{kind.kind} in version "v1" cannot be handled as a {kind.kind}'
            )
        body_namespace = metadata.get("namespace") or ""
        if kind.namespaced and body_namespace and body_namespace != namespace:
            raise status.bad_request(NAMESPACE_MISMATCH)
        name = metadata.get("name") or ""
        if not isinstance(name, str) or not name:
            raise status.new_invalid(
                "",
                kind.kind,
                "",
                [status.required("metadata.name", "name or generateName is required")],
            )
        is_label = kind.resource == "namespaces"
        pattern, message = (
            (_LABEL, _LABEL_MESSAGE) if is_label else (_SUBDOMAIN, _SUBDOMAIN_MESSAGE)
        )
        if not pattern.match(name) or len(name) > (63 if is_label else 253):
            raise status.new_invalid(
                "", kind.kind, name, [status.invalid("metadata.name", name, message)]
            )
        if kind.namespaced and not self._store.has_namespace(namespace):
            raise ObjectNotFound("namespaces", namespace)  # NamespaceLifecycle admission

        store = self._store
        if kind.resource == "namespaces":
            store.create_namespace(name)
        elif kind.resource == "nodes":
            store.create_node(name)
        elif kind.resource == "serviceaccounts":
            store.create_service_account(namespace, name)
        elif kind.resource == "secrets":
            store.create_secret(namespace, name, type=str(body.get("type") or "Opaque"))
        else:
            account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            store.create_pod(namespace, name, str(account), str(spec.get("nodeName") or "") or None)
        result: dict[str, Any] = self._get(kind, namespace, name).to_json()
        return result
