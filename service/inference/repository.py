"""The model repository: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

Versions are positive integers; a request without a version gets the highest one. Beside
``model.onnx`` (FP32, required) a version folder may hold precision variants of the same model,
``model.int8.onnx`` and ``model.fp16.onnx`` (written by ``cnnserve quantize``); the ``precision``
setting picks which file a server loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MODEL_FILENAME = "model.onnx"
PRECISIONS = ("fp32", "int8", "fp16")


def variant_filename(precision: str) -> str:
    """``model.onnx`` for fp32, ``model.<precision>.onnx`` for the others."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    return MODEL_FILENAME if precision == "fp32" else f"model.{precision}.onnx"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    path: Path  # the FP32 model.onnx

    def variant_path(self, precision: str) -> Path:
        """The file of a precision variant; fp32 is the spec's own file, whatever its name."""
        return self.path if precision == "fp32" else self.path.with_name(variant_filename(precision))

    def variants(self) -> tuple[str, ...]:
        """The precisions whose file is present, in PRECISIONS order: fp32 always (scan found it;
        like it, a variant may be any readable non-folder, a pipe included)."""
        others = (p for p in PRECISIONS[1:] if self.variant_path(p).exists() and not self.variant_path(p).is_dir())
        return ("fp32", *others)


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


#: ModelProto's graph field: a model without one is no model.
_GRAPH_FIELD = 7


def _varint(f: BinaryIO, end: int) -> int | None:
    value = shift = 0
    while f.tell() < end and shift < 64:
        byte = f.read(1)[0]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return None


def onnx_problem(path: Path) -> str | None:
    """Why ``path`` cannot be an ONNX model, from its top-level protobuf fields alone (the graph is
    skipped as one length-delimited field, so this costs microseconds whatever the size), or None.

    Catches what corrupt model files usually are: truncated downloads, Git LFS pointers, HTML error
    pages, empty files. The server checks this once before starting any process, so a bad file is
    one line naming it instead of one ONNX Runtime error per worker. Not a regular file (a pipe):
    not read here; ONNX Runtime's load says what is wrong with it."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        graph = False
        while f.tell() < end:
            at = f.tell()
            key = _varint(f, end)
            if key is None or key >> 3 == 0:
                return f"not an ONNX model (not protobuf at byte {at})"
            wire = key & 7
            if wire == 0:
                if _varint(f, end) is None:
                    return f"not an ONNX model (truncated at byte {at})"
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                length = _varint(f, end)
                if length is None or f.tell() + length > end:
                    return f"not an ONNX model (truncated: a field at byte {at} runs past the end, {end} bytes)"
                f.seek(length, os.SEEK_CUR)
                graph = graph or key >> 3 == _GRAPH_FIELD
            else:
                return f"not an ONNX model (not protobuf at byte {at})"
        if f.tell() > end:
            return f"not an ONNX model (truncated at byte {end})"
    return None if graph else "not an ONNX model (it holds no graph)"


def check_files(specs: list[ModelSpec]) -> None:
    """Raise ValueError naming the first model file (any precision variant present) that cannot be
    an ONNX model."""
    for spec in specs:
        for precision in spec.variants():
            problem = onnx_problem(spec.variant_path(precision))
            if problem:
                raise ValueError(f"model file {spec.variant_path(precision)} is {problem}")
