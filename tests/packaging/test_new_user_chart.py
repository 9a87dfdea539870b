"""Two things a new operator relies on when installing: the admin listener's default port does
not clash with Prometheus on the same machine (it was 9090, Prometheus's own), the same in the
broker, the chart and the image; and a certificate cert-manager renews reaches the running pods
without a restart (the README's Helm section said the opposite of its TLS section)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from broker.config import AdminSettings, split_host_port
from tests.packaging.test_helm import (
    CHART,
    FULLNAME,
    PRODUCTION,
    ROOT,
    broker_container,
    broker_pod,
    config_map_files,
    one,
    render,
)

# Prometheus's own port and its components' and exporters' ("default port allocations": the
# range 9091-9999 is allocated to them), and the web port every developer's machine has.
PROMETHEUS_PORTS = set(range(9090, 10000))
COMMON_DEV_PORTS = {8080, 50051}


def test_the_admin_port_clashes_with_no_prometheus_component() -> None:
    listen = AdminSettings().listen
    assert listen is not None
    host, port = split_host_port(listen, "admin.listen")
    assert host == "127.0.0.1"
    assert port not in PROMETHEUS_PORTS | COMMON_DEV_PORTS
    # The same port in the chart (container, Service, probes, ServiceMonitor, NetworkPolicy,
    # the broker's own config) and the image.
    docs = render(PRODUCTION)
    container = broker_container(docs)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["admin"] == port
    service = one(docs, "Service", FULLNAME)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["admin"] == port
    assert container["livenessProbe"]["httpGet"]["port"] == "admin"
    assert [e["port"] for e in one(docs, "ServiceMonitor")["spec"]["endpoints"]] == ["admin"]
    ingress_ports = [
        p["port"] for r in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in r["ports"]
    ]
    assert "admin" in ingress_ports
    assert f":{port}" in re.sub(r"\s", "", config_map_files(docs)["config.yaml"])
    exposed = re.search(r"^EXPOSE (.+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert exposed is not None and str(port) in exposed.group(1).split()
    assert f"admin: {port}" in (CHART / "values.yaml").read_text()


def test_renewed_certificates_reach_the_pods_without_a_restart() -> None:
    # The TLS Secret (cert-manager's, in the production example) and the client CA are mounted
    # as directories: the kubelet updates the files when the Secret is renewed (a subPath mount
    # would never change), and the broker follows the files its config names there. Nothing of
    # the certificate is in the pod template, so a renewal does not roll the pods either.
    docs = render(PRODUCTION)
    assert one(docs, "Certificate")["spec"]["secretName"] == f"{FULLNAME}-tls"
    mounts = {m["name"]: m for m in broker_container(docs)["volumeMounts"]}
    for name in ("tls", "client-ca"):
        assert "subPath" not in mounts[name], name
    tls = yaml.safe_load(config_map_files(docs)["config.yaml"])["server"]["tls"]
    for key, mount in (("certFile", "tls"), ("keyFile", "tls"), ("clientCaFile", "client-ca")):
        assert Path(tls[key]).parent == Path(mounts[mount]["mountPath"]), key
    annotations = broker_pod(docs)["metadata"].get("annotations", {})
    assert not [a for a in annotations if "tls" in a or "cert" in a], annotations
