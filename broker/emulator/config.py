"""EmulatorConfig: the API server's flags that change TokenRequest behaviour."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SIGNING_ALGORITHMS = ("RS256", "ES256")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class EmulatorConfig:
    host: str = "127.0.0.1"  # a loopback address (127.0.0.0/8, ::1) or localhost
    port: int = 0  # 0 = a free port, chosen at start()
    # --service-account-issuer (the first one signs).
    issuer: str = DEFAULT_ISSUER
    # --api-audiences; empty (or not given) means [issuer], as the apiserver defaults it.
    api_audiences: list[str] = field(default_factory=list)
    # --service-account-max-token-expiration (rule 8); None = no maximum.
    max_expiration_seconds: int | None = None
    # Feature gate ServiceAccountTokenNodeBinding (off in 1.30, on from 1.31).
    node_binding: bool = False
    # Feature gate ServiceAccountTokenPodNodeInfo (beta, on in 1.30): node claim in pod tokens.
    pod_node_info: bool = True
    # --service-account-extend-token-expiration: the kubelet's 3607 s tokens live a year.
    extend_expiration: bool = False
    signing_algorithm: str = "RS256"
    # PEM private key (PKCS#8 or traditional) to sign with; None = generated. Generated keys are
    # cached per process and algorithm: RSA generation costs ~0.1 s and tests start many
    # emulators. Set reuse_signing_key=False for a key of this instance's own.
    signing_key_pem: bytes | None = None
    reuse_signing_key: bool = True
    # jwks_uri in the discovery document; None = this emulator's own /openid/v1/jwks.
    jwks_uri: str | None = None
    # Seed: a mapping, or a YAML/JSON file (see broker.emulator.seed).
    seed: dict[str, Any] | str | Path | None = None
    # The version /version reports.
    git_version: str = "v1.30.0"

    def __post_init__(self) -> None:
        if self.signing_algorithm not in SIGNING_ALGORITHMS:
            raise ValueError(
                f"signing_algorithm must be one of {', '.join(SIGNING_ALGORITHMS)}, "
                f"not {self.signing_algorithm!r}"
            )
        if not _is_loopback(self.host):
            raise ValueError(f"the emulator serves on loopback only, not on {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        if self.max_expiration_seconds is not None and self.max_expiration_seconds <= 0:
            raise ValueError("max_expiration_seconds must be positive")
        self.api_audiences = list(self.api_audiences) or [self.issuer]

    @property
    def audiences(self) -> list[str]:
        """The API server's own audiences (a copy)."""
        return list(self.api_audiences) or [self.issuer]
