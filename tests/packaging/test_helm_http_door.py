"""The chart's opt-in HTTP door (`http.enabled`): off by default; on, a container port and a
Service port named https, the NetworkPolicy's token-API rule opens it, the broker's config
listens there (and loads with the broker), the probes stay on the admin/health ports."""

from __future__ import annotations

from tests.packaging.test_helm import (
    FULLNAME,
    PRODUCTION,
    broker_container,
    load_settings_from,
    merged,
    one,
    render,
    render_error,
)


def test_off_by_default() -> None:
    docs = render(PRODUCTION)
    assert "https" not in [p["name"] for p in broker_container(docs)["ports"]]
    assert load_settings_from(docs).server.http_listen is None


def test_enabled_opens_the_port_everywhere_it_must() -> None:
    docs = render(merged(PRODUCTION, http={"enabled": True, "port": 9443}))
    container = broker_container(docs)
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["https"] == 9443
    service = one(docs, "Service", FULLNAME)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}["https"] == (
        9443,
        "https",
    )
    (token_api, _) = one(docs, "NetworkPolicy")["spec"]["ingress"]
    assert [p["port"] for p in token_api["ports"]] == ["grpc", "https"]
    settings = load_settings_from(docs)
    assert settings.server.http_listen == "0.0.0.0:9443"
    assert settings.server.tls is not None  # the same certificate as gRPC
    # Probes are unchanged: the admin and health listeners.
    assert container["livenessProbe"]["httpGet"]["port"] == "admin"


def test_the_external_service_exposes_it_too() -> None:
    external = {"enabled": True, "type": "LoadBalancer", "port": 443}
    off = render(merged(PRODUCTION, service={"external": external}))
    on = render(
        merged(PRODUCTION, service={"external": external}, http={"enabled": True, "port": 8444})
    )
    name = f"{FULLNAME}-external"
    assert [p["name"] for p in one(off, "Service", name)["spec"]["ports"]] == ["grpc"]
    ports = {
        p["name"]: (p["port"], p["targetPort"]) for p in one(on, "Service", name)["spec"]["ports"]
    }
    assert ports == {"grpc": (443, "grpc"), "https": (8444, "https")}


def test_schema_refuses_a_bad_port() -> None:
    error = render_error(merged(PRODUCTION, http={"enabled": True, "port": 0}))
    assert "at '/http/port'" in error
