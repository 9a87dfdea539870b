# token-broker image: `token-broker serve` as a non-root user on a read-only root filesystem.
#
#   docker build -t registry.example.com/token-broker:0.1.0 .
#
# Pin the base image by digest for reproducible builds (--build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: a venv with the broker and its dependencies (wheels; pinned by constraints.txt) ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY broker ./broker
# Not editable: the package is copied into the venv (byte-compiled there, so the read-only
# image never needs to write .pyc files). With the redis extra (rateLimit.backend: redis).
# pip itself is not needed at run time.
RUN /opt/venv/bin/pip install --constraint constraints.txt ".[redis]" \
    && /opt/venv/bin/pip uninstall --yes pip

# --- runtime: the venv only; no compiler, no pip in the venv, no source tree ---
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
COPY --from=builder /opt/venv /opt/venv
# Numeric, so runAsNonRoot can verify it; the chart sets the same ids.
USER 65532:65532
# gRPC (TLS), plaintext gRPC health (server.healthListen), admin HTTP /metrics /healthz /readyz.
EXPOSE 8443 8081 8082
ENTRYPOINT ["token-broker"]
CMD ["serve", "--config", "/etc/token-broker/config.yaml"]
