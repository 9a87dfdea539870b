"""The per-rule `cache` setting of the policy and `Decision.cacheable`."""

from __future__ import annotations

from typing import Any

import pytest

from broker.identity import Identity
from broker.policy import Policy, PolicyError
from tests.support.stack import create_request

CI = Identity(method="mtls", name="spiffe://example.org/ci/runner")


def rule(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "ci",
        "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
        "namespaces": ["ci"],
        "serviceAccounts": ["deployer"],
        "audiences": ["vault"],
        "defaultAudiences": ["vault"],
    }
    base.update(overrides)
    return base


def decide(**overrides: Any) -> Any:
    policy = Policy.from_dict({"rules": [rule(**overrides)]})
    return policy.decide(CI, create_request("ci", "deployer"))


def test_rules_allow_caching_by_default() -> None:
    decision = decide()
    assert decision.allowed and decision.cacheable


def test_a_rule_can_turn_caching_off() -> None:
    decision = decide(cache={"enabled": False})
    assert decision.allowed and not decision.cacheable
    assert decide(cache={"enabled": True}).cacheable
    assert decide(cache={}).cacheable


def test_denials_are_not_cacheable() -> None:
    policy = Policy.from_dict({"rules": [rule()]})
    denied = policy.decide(CI, create_request("other", "deployer"))
    assert not denied.allowed and not denied.cacheable
    rejected = decide(cache={"enabled": True}, boundObject={"required": True})
    assert not rejected.allowed and not rejected.cacheable


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"enabled": "yes"}, "rules[0].cache.enabled"),
        ({"ttl": 5}, "rules[0].cache.ttl"),
        (True, "rules[0].cache"),
    ],
)
def test_invalid_cache_settings_name_the_key(value: object, key: str) -> None:
    with pytest.raises(PolicyError, match=key.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_dict({"rules": [rule(cache=value)]})


def test_yaml_spelling() -> None:
    policy = Policy.from_yaml(
        """
rules:
  - name: no-cache
    subjects: [{method: mtls, name: "spiffe://example.org/ci/*"}]
    namespaces: [ci]
    serviceAccounts: [deployer]
    audiences: [vault]
    defaultAudiences: [vault]
    cache: {enabled: false}
"""
    )
    assert not policy.decide(CI, create_request("ci", "deployer")).cacheable
