"""The Helm chart (helm/token-broker): lint, render, validate, and check what matters.

Rendering uses the real helm binary (.venv/bin/helm, installed by `make helm`:
helm/fetch_helm.py). Every rendered manifest is validated with kubernetes-validate against
Kubernetes 1.30 (strict: unknown fields are errors), except the CRD kinds it has no schema for
(SKIPPED_CRD_KINDS). The broker config and the policy rendered into the ConfigMap are loaded
with the broker's own loaders, so chart values and broker settings cannot drift apart.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel

from broker import config as broker_config
from broker import policy_schema
from broker.client.agent_config import parse_agent_config
from broker.config import RateSettings, load_settings
from broker.policy import Policy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "token-broker"
EXAMPLES = ROOT / "helm" / "examples"
HELM = Path(sys.executable).parent / "helm"
KUBE_VERSION = "1.30.0"
RELEASE = "tb"
NAMESPACE = "token-broker"
FULLNAME = "tb-token-broker"
# Custom resources: kubernetes-validate only knows the built-in kinds. Their shape is
# checked by the assertions below instead.
SKIPPED_CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
}

POLICY_RULES: list[dict[str, Any]] = [
    {
        "name": "ci-deploys",
        "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
        "namespaces": ["ci", "staging"],
        "serviceAccounts": ["deployer", "migrator"],
        "audiences": ["vault"],
        "defaultAudiences": ["vault"],
        "maxExpiration": "1h",
    },
    {
        "name": "nightly",
        "subjects": [{"method": "apiKey", "name": "nightly-build"}],
        "namespaces": ["ci"],
        "serviceAccounts": ["build-robot", "deployer"],
        "audiences": ["registry.example.com"],
        "defaultAudiences": ["registry.example.com"],
    },
]
POLICY_RBAC = {"ci": ["build-robot", "deployer", "migrator"], "staging": ["deployer", "migrator"]}

# Everything optional turned on: mTLS, Redis, ServiceMonitor, PrometheusRule, the Grafana
# dashboard, PDB, NetworkPolicy, HPA,
# cert-manager, API keys and a JWKS from Secrets, an external Service, HTTP probes.
PRODUCTION = yaml.safe_load((EXAMPLES / "values-production.yaml").read_text())
PRODUCTION_RBAC = {
    "ci": ["build-robot", "deployer", "migrator"],
    "staging": ["deployer", "migrator"],
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "policy": {"policy": {"rules": POLICY_RULES}},
    "production": PRODUCTION,
    "secret-tls-mtls-redis": {
        "tls": {"secretName": "broker-tls", "clientCA": {"configMapName": "client-ca"}},
        "authentication": {
            "mtls": {"enabled": True},
            "apiKeys": {"keys": [{"name": "ci", "sha256": "ab" * 32}]},
        },
        "policy": {"rules": POLICY_RULES},
        "rateLimit": {
            "backend": "redis",
            "perCaller": False,
            "redis": {
                "address": "redis.redis.svc:6380",
                "username": "broker",
                "existingSecret": "redis-auth",
                "tls": {
                    "enabled": True,
                    "caSecret": "redis-ca",
                    "clientCertSecret": "redis-client",
                },
            },
        },
        "networkPolicy": {"enabled": True},
        "podDisruptionBudget": {"enabled": True},
        "podAntiAffinity": "hard",
        "service": {"external": {"enabled": True, "type": "NodePort", "nodePort": 30443}},
    },
    "wildcards-opted-in": {
        "rbac": {"allowWildcardGrants": True},
        "policy": {
            "rules": [
                *POLICY_RULES,
                {
                    "name": "team-robots",
                    "subjects": [{"method": "apiKey", "name": "teams"}],
                    "namespaces": ["team-*"],
                    "serviceAccounts": ["robot"],
                },
                {
                    "name": "sandbox-any",
                    "subjects": [{"method": "apiKey", "name": "sandbox"}],
                    "namespaces": ["sandbox"],
                    "serviceAccounts": ["*"],
                },
            ]
        },
    },
}


# --- helpers ------------------------------------------------------------------------------


def helm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"no helm at {HELM}: run `make helm` (helm/fetch_helm.py)")
    return subprocess.run(
        [str(HELM), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


@functools.cache
def _template(values_yaml: str) -> subprocess.CompletedProcess[str]:
    return helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "--kube-version", KUBE_VERSION, "--values", "-",
        stdin=values_yaml,
    )  # fmt: skip


def render_result(values: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return _template(yaml.safe_dump(values, sort_keys=True))


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    result = render_result(values)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(values: dict[str, Any]) -> str:
    result = render_result(values)
    assert result.returncode != 0, "helm template succeeded, expected a failure"
    return result.stderr


def merged(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(copy.deepcopy(sections))
    return out


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in kinds(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def broker_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]


def broker_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = broker_pod(docs)["spec"]["containers"]
    return container


def config_map_files(docs: list[dict[str, Any]]) -> dict[str, str]:
    return one(docs, "ConfigMap", FULLNAME)["data"]


def labels_of_test_pod(docs: list[dict[str, Any]]) -> dict[str, str]:
    labels = one(docs, "Pod")["metadata"]["labels"]
    keys = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")
    return {key: labels[key] for key in keys}


def load_settings_from(docs: list[dict[str, Any]]) -> broker_config.Settings:
    """The rendered config.yaml, loaded by the broker (as `serve --config` would)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_map_files(docs)["config.yaml"])
        return load_settings(path)


@pytest.fixture(autouse=True)
def _no_broker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings reads TOKEN_BROKER_* too: only the rendered file may count here.
    for name in list(os.environ):
        if name.upper().startswith("TOKEN_BROKER_"):
            monkeypatch.delenv(name)


# --- lint and validation --------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, EXAMPLES / "values-production.yaml"], ids=str)
def test_helm_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", str(values)]
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_manifest_is_valid_kubernetes(name: str) -> None:
    docs = render(VALUE_SETS[name])
    validated = set()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in SKIPPED_CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        validated.add(doc["kind"])
    assert {"Deployment", "Service", "ServiceAccount", "ConfigMap", "Pod"} <= validated


def test_production_values_render_every_optional_object() -> None:
    docs = render(PRODUCTION)
    assert {d["kind"] for d in docs} == {
        "Certificate",
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
    }
    assert "replicas" not in one(docs, "Deployment")["spec"]  # the HPA owns it
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2

    cert = one(docs, "Certificate")
    assert cert["spec"]["secretName"] == f"{FULLNAME}-tls"
    assert cert["spec"]["issuerRef"] == {
        "name": "internal-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert f"{FULLNAME}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert "token-broker.example.com" in cert["spec"]["dnsNames"]

    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {
        "port": "admin",
        "path": "/metrics",
        "scheme": "http",
        "interval": "15s",
        "scrapeTimeout": "5s",
    }
    internal = one(docs, "Service", FULLNAME)
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= internal["metadata"]["labels"].items()
    external = one(docs, "Service", f"{FULLNAME}-external")
    assert not selector.items() <= external["metadata"]["labels"].items()
    assert [p["name"] for p in external["spec"]["ports"]] == ["grpc"]


# --- RBAC -------------------------------------------------------------------------------------


def rbac_by_namespace(docs: list[dict[str, Any]]) -> dict[str, list[str] | None]:
    """namespace -> resourceNames of its Role (None: no resourceNames)."""
    out: dict[str, list[str] | None] = {}
    for role in kinds(docs, "Role"):
        (rule,) = role["rules"]
        out[role["metadata"]["namespace"]] = rule.get("resourceNames")
    return out


def assert_no_wildcards(docs: list[dict[str, Any]]) -> None:
    for doc in kinds(docs, "Role") + kinds(docs, "ClusterRole"):
        for rule in doc["rules"]:
            assert rule["apiGroups"] == [""]
            assert rule["resources"] == ["serviceaccounts/token"]
            assert rule["verbs"] == ["create"]
            for key in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(key, []), (doc["metadata"]["name"], key)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("defaults", {}), ("policy", POLICY_RBAC), ("production", PRODUCTION_RBAC)],
)
def test_rbac_is_exactly_the_policys_service_accounts(
    name: str, expected: dict[str, list[str]]
) -> None:
    docs = render(VALUE_SETS[name])
    assert rbac_by_namespace(docs) == expected
    assert not kinds(docs, "ClusterRole") and not kinds(docs, "ClusterRoleBinding")
    assert_no_wildcards(docs)
    bindings = kinds(docs, "RoleBinding")
    assert {b["metadata"]["namespace"] for b in bindings} == set(expected)
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"{FULLNAME}-token-creator",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_wildcard_verbs_or_resources_anywhere(name: str) -> None:
    assert_no_wildcards(render(VALUE_SETS[name]))


def pattern_rule(namespaces: list[str], service_accounts: list[str]) -> dict[str, Any]:
    return {
        "name": "broad-rule",
        "subjects": [{"method": "apiKey", "name": "ops"}],
        "namespaces": namespaces,
        "serviceAccounts": service_accounts,
    }


@pytest.mark.parametrize(
    ("namespaces", "service_accounts", "message"),
    [
        (["team-*"], ["deployer"], 'the namespace pattern "team-*"'),
        (["ci"], ["deploy-?"], 'the service-account pattern "deploy-?" in namespace "ci"'),
        (["ci"], ["[ab]-robot"], 'the service-account pattern "[ab]-robot"'),
    ],
)
def test_a_pattern_fails_without_the_opt_in(
    namespaces: list[str], service_accounts: list[str], message: str
) -> None:
    values = {"policy": {"rules": [*POLICY_RULES, pattern_rule(namespaces, service_accounts)]}}
    error = render_error(values)
    assert 'policy rule "broad-rule"' in error
    assert message in error
    assert "rbac.allowWildcardGrants=true" in error


def test_the_opt_in_renders_the_broader_grants_and_nothing_more() -> None:
    docs = render(VALUE_SETS["wildcards-opted-in"])
    # Literal rules keep their resourceNames; the SA pattern in `sandbox` drops them there.
    assert rbac_by_namespace(docs) == {**POLICY_RBAC, "sandbox": None}
    # The namespace pattern: one ClusterRole, still limited to the literal service account.
    (cluster_role,) = kinds(docs, "ClusterRole")
    assert cluster_role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["serviceaccounts/token"],
            "verbs": ["create"],
            "resourceNames": ["robot"],
        }
    ]
    (binding,) = kinds(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
    ]
    assert_no_wildcards(docs)

    # A namespace pattern with a service-account pattern: the ClusterRole has no resourceNames.
    values = {
        "rbac": {"allowWildcardGrants": True},
        "policy": {"rules": [pattern_rule(["team-*"], ["*"])]},
    }
    (cluster_role,) = kinds(render(values), "ClusterRole")
    assert "resourceNames" not in cluster_role["rules"][0]


def test_rbac_create_false_renders_no_rbac() -> None:
    docs = render({"rbac": {"create": False}, "policy": {"rules": POLICY_RULES}})
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert not kinds(docs, kind)


# --- pod hardening, probes, ports -------------------------------------------------------------


def assert_hardened(pod_spec: dict[str, Any]) -> None:
    pod = pod_spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == 65532 and pod["runAsGroup"] == 65532
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod_spec["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["privileged"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["runAsNonRoot"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_pods_are_hardened(name: str) -> None:
    docs = render(VALUE_SETS[name])
    broker = broker_pod(docs)["spec"]
    assert_hardened(broker)
    assert broker["securityContext"]["fsGroup"] == 65532
    # Only the broker mounts a service-account token (in-cluster config).
    assert broker["automountServiceAccountToken"] is True
    assert one(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    test_pod = one(docs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["automountServiceAccountToken"] is False
    assert_hardened(test_pod["spec"])


@pytest.mark.parametrize("probe_type", ["grpc", "http"])
def test_probes_target_ports_of_the_container_and_the_service(probe_type: str) -> None:
    docs = render({"probes": {"type": probe_type}})
    container = broker_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 8443, "health": 8081, "admin": 8082}
    service = one(docs, "Service", FULLNAME)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]} == {
        name: name for name in ports
    }
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    if probe_type == "grpc":
        assert readiness["grpc"] == {
            "port": ports["health"],
            "service": "tokenbroker.v1.TokenBrokerService",
        }
    else:
        assert readiness["httpGet"] == {"path": "/readyz", "port": "admin"}
    # Liveness never follows the API server's reachability (the gRPC health status does).
    assert liveness["httpGet"] == {"path": "/healthz", "port": "admin"}

    settings = load_settings_from(docs)
    assert settings.server.listen == f"0.0.0.0:{ports['grpc']}"
    assert settings.server.health_listen == f"0.0.0.0:{ports['health']}"
    assert settings.admin.listen == f"0.0.0.0:{ports['admin']}"


def test_network_policy_allows_only_the_broker_ports_and_needed_egress() -> None:
    docs = render(PRODUCTION)
    spec = one(docs, "NetworkPolicy")["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in spec["ingress"] for p in rule["ports"]]
    assert sorted(ingress_ports) == ["admin", "grpc", "health"]
    (grpc_rule, admin_rule) = spec["ingress"]
    assert "from" not in grpc_rule  # callers outside the cluster
    assert {"podSelector": {"matchLabels": labels_of_test_pod(docs)}} in admin_rule["from"]
    egress_ports = {(p["port"], p["protocol"]) for rule in spec["egress"] for p in rule["ports"]}
    assert {(443, "TCP"), (6443, "TCP"), (53, "UDP"), (53, "TCP"), (6379, "TCP")} <= egress_ports
    api_server = spec["egress"][0]
    assert api_server["to"] == [
        {"ipBlock": {"cidr": "10.0.0.1/32"}},
        {"ipBlock": {"cidr": "172.18.0.0/24"}},
    ]


# --- the broker config and policy: the broker's own loaders -----------------------------------


def mounted_path(container: dict[str, Any], path: Path) -> bool:
    return any(path.is_relative_to(m["mountPath"]) for m in container["volumeMounts"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_rendered_config_and_policy_load_with_the_broker(name: str) -> None:
    values = VALUE_SETS[name]
    docs = render(values)
    settings = load_settings_from(docs)
    broker_config.check_transport_security(settings)  # TLS on a non-loopback address
    files = config_map_files(docs)
    policy = Policy.from_yaml(files["policy.yaml"], "policy.yaml")
    rules = values.get("policy", {}).get("rules", [])
    assert [r.name for r in policy.rules] == [r["name"] for r in rules]

    assert settings.kubernetes.mode == "inCluster"
    assert settings.audit.sink == "stdout"
    assert settings.server.tls is not None
    container = broker_container(docs)
    assert container["args"] == ["serve", "--config", "/etc/token-broker/config.yaml"]
    assert settings.policy.file == Path("/etc/token-broker/policy.yaml")
    # Every file the broker is told to read is mounted into its container.
    paths = [
        settings.policy.file,
        settings.server.tls.cert_file,
        settings.server.tls.key_file,
        settings.server.tls.client_ca_file,
        settings.authentication.api_keys.file,
        *(i.jwks_file for i in settings.authentication.jwt.issuers),
        *(i.jwks_ca_file for i in settings.authentication.jwt.issuers),
        settings.rate_limit.redis.password_file,
        settings.rate_limit.redis.tls.ca_file,
        settings.rate_limit.redis.tls.cert_file,
        settings.rate_limit.redis.tls.key_file,
    ]
    for path in paths:
        if path is not None:
            assert mounted_path(container, path), f"{path} is not mounted"


def test_production_config_says_what_the_values_say() -> None:
    docs = render(PRODUCTION)
    settings = load_settings_from(docs)
    tls = settings.server.tls
    assert tls is not None and tls.client_ca_file is not None
    assert tls.require_client_cert is False
    assert settings.authentication.mtls.enabled is True
    assert settings.authentication.api_keys.file is not None
    github, internal, corp = settings.authentication.jwt.issuers
    assert github.jwks_url == "https://token.actions.githubusercontent.com/.well-known/jwks"
    assert github.jwks_ca_file is None  # the system's CAs
    assert internal.jwks_file is not None and internal.algorithms == ("ES256",)
    assert corp.jwks_url == "https://sso.corp.example/oauth2/jwks"
    assert corp.jwks_ca_file == Path("/var/run/secrets/token-broker/jwks-ca/2/ca.crt")
    assert settings.audit.fail_closed is True
    assert settings.metrics.caller_labels is True
    redis = settings.rate_limit.redis
    assert settings.rate_limit.backend == "redis"
    assert redis.address == "redis-master.redis.svc.cluster.local:6379"
    assert redis.password_file is not None and redis.tls.enabled and redis.tls.ca_file
    # The Secrets behind the files.
    volumes = {v["name"]: v for v in broker_pod(docs)["spec"]["volumes"]}
    secrets = {name: v["secret"]["secretName"] for name, v in volumes.items() if "secret" in v}
    assert secrets == {
        "tls": f"{FULLNAME}-tls",
        "client-ca": "token-broker-client-ca",
        "api-keys": "token-broker-api-keys",
        "jwks-1": "internal-oidc-jwks",
        "jwks-ca-2": "corp-root-ca",
        "redis-password": "token-broker-redis",
        "redis-ca": "redis-ca",
    }
    assert volumes["redis-password"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert volumes["jwks-ca-2"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_pods_leave_the_endpoints_before_the_listeners_close() -> None:
    # The chart's default: serve on (not ready) after SIGTERM while the endpoint goes away,
    # then drain, all within the pod's termination grace period.
    docs = render({})
    settings = load_settings_from(docs)
    assert settings.server.shutdown_delay_seconds == 5
    assert settings.server.shutdown_grace_seconds == 15
    assert broker_pod(docs)["spec"]["terminationGracePeriodSeconds"] == 30


def test_a_rate_limit_scope_set_to_false_is_unlimited() -> None:
    settings = load_settings_from(render(VALUE_SETS["secret-tls-mtls-redis"]))
    assert settings.rate_limit.per_caller is None
    assert settings.rate_limit.per_service_account is not None
    assert settings.rate_limit.redis.username == "broker"
    assert settings.rate_limit.redis.tls.cert_file is not None


# Values sections rendered into config.yaml as they are -> the broker's model. Every key the
# schema accepts there must be a key the broker accepts (minus the chart's own, which the
# chart turns into file paths).
SCHEMA_SECTIONS: list[tuple[str, type[BaseModel], set[str]]] = [
    ("log", broker_config.LogSettings, set()),
    ("server", broker_config.ServerSettings, set()),
    ("kubernetes", broker_config.KubernetesSettings, set()),
    ("kubernetes.retry", broker_config.RetrySettings, set()),
    ("audit", broker_config.AuditSettings, set()),
    ("metrics", broker_config.MetricsSettings, set()),
    ("readiness", broker_config.ReadinessSettings, set()),
    ("cache", broker_config.CacheSettings, set()),
    ("rateLimit", broker_config.RateLimitSettings, set()),
    ("rateLimit.upstream", broker_config.UpstreamLimitSettings, set()),
    ("rateLimit.redis", broker_config.RedisSettings, {"existingSecret", "passwordKey"}),
    (
        "rateLimit.redis.tls",
        broker_config.RedisTLSSettings,
        {"caSecret", "caKey", "clientCertSecret"},
    ),
    ("authentication.mtls", broker_config.MTLSAuthSettings, set()),
    ("authentication.apiKeys", broker_config.ApiKeySettings, {"existingSecret", "secretKey"}),
    ("authentication.apiKeys.keys[]", broker_config.ApiKeyEntry, set()),
    (
        "authentication.jwt.issuers[]",
        broker_config.JwtIssuerSettings,
        {"jwksSecret", "jwksCaSecret"},
    ),
    ("policy", broker_config.PolicySettings, {"rules"}),
    ("policy.rules[]", policy_schema.Rule, set()),
    ("policy.rules[].subjects[]", policy_schema.Subject, set()),
    ("policy.rules[].boundObject", policy_schema.BoundObject, set()),
    ("policy.rules[].cache", policy_schema.RuleCache, set()),
]


def schema_at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema
    for part in dotted.split("."):
        node = node["properties"][part.removesuffix("[]")]
        if part.endswith("[]"):
            node = node["items"]
    return node


def model_keys(model: type[BaseModel]) -> set[str]:
    return {field.alias or name for name, field in model.model_fields.items()}


@pytest.mark.parametrize(
    ("section", "model", "chart_keys"), SCHEMA_SECTIONS, ids=[s for s, _, _ in SCHEMA_SECTIONS]
)
def test_schema_accepts_only_keys_the_broker_accepts(
    section: str, model: type[BaseModel], chart_keys: set[str]
) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    node = schema_at(schema, section)
    assert node["additionalProperties"] is False
    unknown = set(node["properties"]) - chart_keys - model_keys(model)
    assert not unknown, f"{section}: the broker has no {sorted(unknown)}"


# --- values.schema.json -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 0}, "at '/replicaCount': minimum: got 0, want 1"),
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"probes": {"type": "tcp"}}, "at '/probes/type': value must be one of 'grpc', 'http'"),
        ({"log": {"level": "verbose"}}, "at '/log/level'"),
        ({"ports": {"grpc": 70000, "health": 8081, "admin": 8082}}, "at '/ports/grpc'"),
        ({"podSecurityContext": {"runAsUser": 0}}, "at '/podSecurityContext/runAsUser'"),
        ({"rateLimit": {"redis": {"address": "redis"}}}, "at '/rateLimit/redis/address'"),
        (
            {"authentication": {"apiKeys": {"keys": [{"name": "ci", "sha256": "tbk_secret"}]}}},
            "at '/authentication/apiKeys/keys/0/sha256'",
        ),
        (
            {"policy": {"rules": [{**POLICY_RULES[0], "serviceAccount": ["x"]}]}},
            "additional properties 'serviceAccount' not allowed",
        ),
        (
            {"policy": {"rules": [{**POLICY_RULES[0], "namespaces": []}]}},
            "at '/policy/rules/0/namespaces': minItems",
        ),
        (
            {"podDisruptionBudget": {"enabled": True, "minAvailable": 1, "maxUnavailable": 1}},
            "at '/podDisruptionBudget'",
        ),
        (  # a JWKS CA is for a jwksUrl, not a JWKS file
            {
                "authentication": {
                    "jwt": {
                        "issuers": [
                            {
                                "issuer": "https://sso.example",
                                "audiences": ["tb"],
                                "jwksSecret": {"name": "jwks"},
                                "jwksCaSecret": {"name": "ca"},
                            }
                        ]
                    }
                }
            },
            "at '/authentication/jwt/issuers/0'",
        ),
    ],
)
def test_schema_rejects_bad_values_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    error = render_error(values)
    assert "don't meet the specifications of the schema" in error
    assert message in error


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"authentication": {"mtls": {"enabled": True}}}, "authentication.mtls.enabled needs"),
        ({"rateLimit": {"backend": "redis"}}, "rateLimit.redis.address (host:port) is required"),
        ({"tls": {"certManager": {"enabled": True}}}, "tls.certManager.issuerRef.name is required"),
        (
            {"terminationGracePeriodSeconds": 10},
            "(10) must be longer than server.shutdownDelaySeconds + server.shutdownGraceSeconds "
            "(20)",
        ),
        # Longer than the grace alone is not enough: the delay comes first.
        (
            {"terminationGracePeriodSeconds": 20, "server": {"shutdownGraceSeconds": 15}},
            "(20) must be longer than server.shutdownDelaySeconds + server.shutdownGraceSeconds",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(
    values: dict[str, Any], message: str
) -> None:
    assert message in render_error(values)


# --- rollouts -------------------------------------------------------------------------------------


def test_changing_only_the_policy_does_not_roll_the_pods() -> None:
    before = render({"policy": {"rules": POLICY_RULES}})
    changed_rules = copy.deepcopy(POLICY_RULES)
    changed_rules[0]["namespaces"] = ["ci", "prod"]
    changed_rules[1]["maxExpiration"] = "2h"
    after = render({"policy": {"rules": changed_rules}})

    assert config_map_files(before)["policy.yaml"] != config_map_files(after)["policy.yaml"]
    assert config_map_files(before)["config.yaml"] == config_map_files(after)["config.yaml"]
    assert broker_pod(before) == broker_pod(after)
    assert set(rbac_by_namespace(after)) == {"ci", "prod"}
    # The policy is a mounted file (no subPath: ConfigMap updates reach the running pod).
    mount = next(m for m in broker_container(after)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/token-broker" and "subPath" not in mount

    # A broker config change does roll them.
    relogged = render({"policy": {"rules": POLICY_RULES}, "log": {"level": "debug"}})
    checksum = "checksum/config"
    assert (
        broker_pod(relogged)["metadata"]["annotations"][checksum]
        != broker_pod(before)["metadata"]["annotations"][checksum]
    )


# --- the helm test pod, NOTES, the sidecar example, the image ------------------------------------


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_the_helm_test_pod_checks_grpc_health(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    address, servicer = health_server
    pod = one(render({}), "Pod")
    (container,) = pod["spec"]["containers"]
    assert container["image"] == broker_container(render({}))["image"]
    assert container["command"] == ["python", "-c"]
    script, target = container["args"]
    assert target == f"{FULLNAME}.{NAMESPACE}.svc:8081"

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, address], capture_output=True, text=True, timeout=30
        )

    service = "tokenbroker.v1.TokenBrokerService"
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    result = run()
    assert result.returncode == 0, result.stderr
    assert f"{service} SERVING" in result.stdout
    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert run().returncode == 1


def test_notes_tell_how_to_get_a_first_token() -> None:
    result = helm(
        "install", RELEASE, str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
        "--values", "-",
        stdin=yaml.safe_dump({"policy": {"rules": POLICY_RULES}}),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "token-broker token deployer -n ci" in notes
    assert f"--server-name {FULLNAME}.{NAMESPACE}.svc --cacert ca.crt" in notes
    assert "no authentication method is configured" in notes


def test_sidecar_example_is_valid_and_hardened() -> None:
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "sidecar.yaml").read_text()) if d]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert_hardened(pod)
    containers = {c["name"]: c for c in pod["containers"]}
    agent = containers["token-broker-agent"]
    assert agent["args"] == ["agent", "--config", "/etc/token-broker-agent/agent.yaml"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = {m["name"] for m in agent["volumeMounts"]} & {
        m["name"] for c in containers.values() if c is not agent for m in c["volumeMounts"]
    }
    assert any("emptyDir" in volumes[name] for name in shared)
    # Its agent.yaml is one the agent accepts, writing where the app reads.
    config = parse_agent_config(yaml.safe_load(one(docs, "ConfigMap")["data"]["agent.yaml"]))
    [sink] = config.sinks
    mounts = {m["mountPath"] for m in agent["volumeMounts"] if m["name"] in shared}
    assert any(str(sink.path).startswith(path + "/") for path in mounts)


def test_dockerfile_matches_the_chart() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert len(stages) == 2
    assert "USER 65532:65532" in dockerfile
    assert "PYTHONDONTWRITEBYTECODE=1" in dockerfile
    assert 'ENTRYPOINT ["token-broker"]' in dockerfile
    assert 'CMD ["serve", "--config", "/etc/token-broker/config.yaml"]' in dockerfile
    (exposed,) = re.findall(r"^EXPOSE\s+(.+)$", dockerfile, re.MULTILINE)
    assert sorted(exposed.split()) == ["8081", "8082", "8443"]
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ".venv" in ignored or "*" in ignored


# --- hardening settings the chart passes through (issue 14) -------------------------------------


def test_the_chart_sets_the_per_peer_limit() -> None:
    default = load_settings_from(render({})).rate_limit.auth_failures_per_peer
    assert default == RateSettings(rate=1, burst=100)
    off = load_settings_from(render({"rateLimit": {"authFailuresPerPeer": False}}))
    assert off.rate_limit.auth_failures_per_peer is None
    tuned = {"rateLimit": {"authFailuresPerPeer": {"rate": 20, "burst": 2000}}}
    settings = load_settings_from(render(tuned))
    assert settings.rate_limit.auth_failures_per_peer == RateSettings(rate=20, burst=2000)


def test_the_chart_passes_the_audit_bounds_through() -> None:
    settings = load_settings_from(render({}))
    assert (settings.audit.sink, settings.audit.write_timeout_seconds) == ("stdout", 2)
    assert settings.audit.max_queued_lines == 10_000
    values = {"audit": {"failClosed": True, "writeTimeoutSeconds": 0.5, "maxQueuedLines": 100}}
    settings = load_settings_from(render(values))
    assert settings.audit.fail_closed is True
    assert (settings.audit.write_timeout_seconds, settings.audit.max_queued_lines) == (0.5, 100)
