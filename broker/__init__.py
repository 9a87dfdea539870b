"""token-broker: short-lived Kubernetes service-account tokens over gRPC."""

__version__ = "0.1.0"
