"""token-broker: short-lived Kubernetes service-account tokens over gRPC."""

# The one place the version is kept: the package metadata reads it (pyproject.toml,
# [tool.setuptools.dynamic]), and tests check the chart's appVersion and CHANGELOG.md.
__version__ = "0.1.0"
