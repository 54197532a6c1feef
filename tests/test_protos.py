"""The generated gRPC code in service/grpc_api/gen/ is exactly what scripts/gen_protos.py makes
from protos/ (regenerate with `python scripts/gen_protos.py`)."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_generated_code_matches_the_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in gen.generate(tmp_path)}
    committed_dir = ROOT / "service" / "grpc_api" / "gen"
    committed = {
        p.relative_to(committed_dir): p.read_bytes()
        for p in committed_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert set(fresh) == set(committed), "generated file set differs: run scripts/gen_protos.py"
    stale = [str(name) for name, content in fresh.items() if committed[name] != content]
    assert not stale, f"stale generated code: {stale}; run scripts/gen_protos.py"
