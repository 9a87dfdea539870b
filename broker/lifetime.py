"""A token's lifetime and when to refresh it: kubelet's rule, shared by both sides.

The broker's token cache (broker.cache), the sidecar agent (broker.client.agent) and the kubectl
credential plugin's file cache (broker.client.exec_credential) all serve a token until
`refresh_due_at`: 80% of its lifetime minus a jitter of 0-10 s
(`pkg/kubelet/token/token_manager.go`). The lifetime is measured on the API server's clock
(`lifetime_seconds`: expiry minus issue time), so clock skew between machines does not matter.

Pure arithmetic on the standard library: the client side imports it without the server side
(see the import contract in pyproject.toml).
"""

from __future__ import annotations

import math
import random

# Served while younger than this fraction of the lifetime (kubelet: refresh in the last 20%).
REFRESH_FRACTION = 0.8
# Jitter subtracted from the refresh point, uniform in [0, this) (kubelet: 10 s).
MAX_JITTER_SECONDS = 10.0


def refresh_due_at(issued_at: float, expires_at: float, jitter: float) -> float:
    """When a token issued at `issued_at` and expiring at `expires_at` is due for refresh.

    kubelet's rule: at 80% of the lifetime, minus `jitter` seconds (drawn by the caller,
    e.g. `default_jitter()`; negative values count as 0), never before `issued_at`. Any clock
    works as long as both times are on it.
    """
    lifetime = max(0.0, expires_at - issued_at)
    return issued_at + max(0.0, REFRESH_FRACTION * lifetime - max(0.0, jitter))


def default_jitter() -> float:
    """Uniform in [0, MAX_JITTER_SECONDS): spreads the refreshes of tokens minted together."""
    return random.uniform(0.0, MAX_JITTER_SECONDS)  # noqa: S311 - jitter, not cryptography


def lifetime_seconds(
    expires_at: float, issued_at: float | None, granted_seconds: float | None
) -> float | None:
    """Seconds from issue to expiry by the API server's clock; None when unknown or not positive.

    `expires_at`: `status.expirationTimestamp`; `issued_at`: the JWT's `iat`, else
    `metadata.creationTimestamp` (both set by the server at issue); without either, the
    `spec.expirationSeconds` the server granted.
    """
    if issued_at is not None:
        lifetime = expires_at - issued_at
    elif granted_seconds is not None:
        lifetime = float(granted_seconds)
    else:
        return None
    return lifetime if lifetime > 0 else None


def numeric_date(value: object) -> float | None:
    """A JWT NumericDate claim (`iat`, `exp`) as seconds; None when missing or not a finite
    number (JSON booleans, strings and NaN/Infinity are not dates)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
