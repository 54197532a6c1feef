"""The model repository: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

Versions are positive integers; a request without a version gets the highest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODEL_FILENAME = "model.onnx"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    path: Path


def scan(root: str | Path) -> list[ModelSpec]:
    """Every ``<name>/<version>/model.onnx`` below ``root``, sorted by name then version number.
    Raises FileNotFoundError when the root is missing or holds no model."""
    root = Path(root).absolute()  # errors name the folder wherever the server was started
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a folder")
    specs = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in model_dir.iterdir():
            if (
                version_dir.is_dir()
                and version_dir.name.isdigit()
                and int(version_dir.name) > 0
                and (version_dir / MODEL_FILENAME).exists()
                and not (version_dir / MODEL_FILENAME).is_dir()
            ):
                specs.append(ModelSpec(model_dir.name, version_dir.name, version_dir / MODEL_FILENAME))
    if not specs:
        raise FileNotFoundError(f"model repository {root} holds no <name>/<version>/{MODEL_FILENAME}")
    return sorted(specs, key=lambda s: (s.name, int(s.version)))
