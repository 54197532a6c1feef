"""Generate the Python gRPC code for protos/ into service/grpc_api/gen/ (the one place it lives).

Run ``python scripts/gen_protos.py`` after editing a .proto; tests/test_protos.py fails while the
committed code differs from what this writes. Imports are rewritten to be package-relative so
the generated modules work without touching sys.path.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "service" / "grpc_api" / "gen"
PACKAGE = "service.grpc_api.gen"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        text = path.read_text()
        text = re.sub(r"^from (cnnserve(?:\.\w+)*) import", rf"from {PACKAGE}.\1 import", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for d in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        for f in files:
            target = OUT / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(f.read_bytes())
            print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
