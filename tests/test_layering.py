"""The server's structure, checked from its source: dependencies between ``service``'s parts point
one way (docs/architecture.md, "Parts and the dependency rule").

Every import of every module under ``service/`` counts, also those inside functions (a lazy import
is still a dependency) and those under ``if TYPE_CHECKING`` (a type-only cycle still ties the
parts together). Parts are ``service``'s sub-packages and top-level modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"

#: What the inference core may not import: the multi-process mode, the explanations, the
#: protocols, the transports and what composes them. They are handed to it (Protocols in
#: service.inference.serving) or built over it (service.server).
INFERENCE_MUST_NOT_IMPORT = {"workers", "explain", "protocol", "http_api", "grpc_api", "server", "dataplane", "cli"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, source: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:  # `from service import server`: the module, not a name in a package
                yield node.lineno, f"{module}.{alias.name}"


def part(module: str) -> str | None:
    """The part of ``service`` a module belongs to (``service.inference.core`` -> ``inference``),
    or None outside ``service`` (and for ``service`` itself: its ``__init__`` holds the version)."""
    parts = module.split(".")
    if parts[0] != "service" or len(parts) < 2:
        return None
    name = parts[1]
    if (SERVICE / name).is_dir() or (SERVICE / f"{name}.py").is_file():
        return name
    return None  # a name defined in service/__init__.py


def sources() -> list[Path]:
    return sorted(p for p in SERVICE.rglob("*.py") if "gen" not in p.relative_to(SERVICE).parts)


def part_edges(files: dict[Path, str]) -> dict[str, dict[str, str]]:
    """part -> {imported part: where (file:line) it is first imported}."""
    edges: dict[str, dict[str, str]] = {}
    for path, source in files.items():
        own = part(module_name(path))
        if own is None:
            continue
        for line, module in imported_modules(path, source):
            other = part(module)
            if other is not None and other != own:
                edges.setdefault(own, {}).setdefault(other, f"{path.relative_to(SERVICE.parent)}:{line}")
    return edges


def inference_violations(files: dict[Path, str]) -> list[str]:
    found = []
    for path, source in files.items():
        if part(module_name(path)) != "inference":
            continue
        for line, module in imported_modules(path, source):
            if part(module) in INFERENCE_MUST_NOT_IMPORT:
                found.append(f"{path.relative_to(SERVICE.parent)}:{line} imports {module}")
    return sorted(set(found))


def find_cycle(edges: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of the part graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(edges.get(node, {})):
            if state.get(other) == 1:
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def read_all() -> dict[Path, str]:
    return {p: p.read_text() for p in sources()}


def test_every_module_is_seen():
    files = read_all()
    names = {module_name(p) for p in files}
    assert {"service.inference.core", "service.workers.supervisor", "service.server"} <= names
    assert not any(".gen" in n for n in names)


def test_inference_imports_none_of_the_parts_built_over_it():
    assert inference_violations(read_all()) == []


def test_no_import_cycle_between_parts():
    edges = part_edges(read_all())
    assert find_cycle(edges) is None, {a: edges[a] for a in find_cycle(edges) or [] if a in edges}
    # The composition root sees every part; nothing but the entry point sees it.
    assert {"inference", "workers", "explain", "http_api", "grpc_api"} <= set(edges["server"])
    assert [p for p, imported in edges.items() if "server" in imported] == ["cli"]


@pytest.mark.parametrize(
    "line",
    [
        "from service.workers import remote_batcher",
        "from service.workers.shared_memory import ControlTable",
        "import service.explain.explainer",
        "from ..http_api import context",
        "from service import protocol",
        "if TYPE_CHECKING:\n    from service.grpc_api.server import GrpcServer",
        "def late():\n    from service.dataplane import DataPlane",
    ],
)
def test_the_rule_catches_a_new_import_in_inference(line):
    """The checks above would fail if the inference core imported a part built over it."""
    files = read_all()
    core = SERVICE / "inference" / "core.py"
    files[core] = files[core] + "\n" + line + "\n"
    assert inference_violations(files), line


def test_the_cycle_check_catches_a_cycle():
    files = read_all()
    batcher = SERVICE / "inference" / "batcher.py"
    files[batcher] = files[batcher] + "\nfrom service.protocol import metadata\n"
    cycle = find_cycle(part_edges(files))
    assert cycle is not None and cycle[0] == cycle[-1] and "inference" in cycle and "protocol" in cycle
