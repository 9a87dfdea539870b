"""Generate the Python code (and .pyi stubs) for proto/ into broker/gen/.

Run it with `make proto`. tests/packaging/test_proto.py regenerates into a temporary
directory and fails when the checked-in code is stale.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
OUT_PACKAGE = "broker.gen"
DEFAULT_OUT = REPO_ROOT / "broker" / "gen"

# protoc emits `from tokenbroker.v1 import ...`; the code lives inside the
# broker package, so absolute imports of our own protos are rewritten.
_IMPORT_RE = re.compile(r"^(from|import) tokenbroker\.", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # imported lazily: a dev dependency

    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    # protoc finds the mypy plugins on PATH: use the ones of this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        for src in sorted(Path(tmp).rglob("*")):
            if not src.is_file():
                continue
            dst = out_dir / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = _IMPORT_RE.sub(rf"\1 {OUT_PACKAGE}.tokenbroker.", src.read_text())
            dst.write_text(text)
    for d in [out_dir, *[p for p in out_dir.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").write_text("")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
