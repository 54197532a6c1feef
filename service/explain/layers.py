"""Intermediate activations by the seed model's names, from the companion graph ``layers.onnx``
(written beside ``model.onnx`` by ``cnnserve export`` / ``cnnserve layers``; see
``export/layers_onnx.py``), and their pictures for /explain.

The served graph keeps its single output; this small CPU session runs in the process that serves
the request, for the few images a request carries (one /explain image, or an Open Inference
Protocol request that asks for a layer by name). Dropout is the identity at inference, so the
activations are exactly those the served model computes.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.inference import repository
from service.inference.repository import ModelSpec

log = logging.getLogger("cnnserve.layers")

LAYERS_FILENAME = "layers.onnx"
FILTERS = "conv1_filters"


@dataclass(frozen=True)
class LayerInfo:
    name: str
    description: str


# One sentence each, for people: what the layer does (after the ideas of CNN Explainer).
LAYERS = (
    LayerInfo(
        "conv1",
        "32 small 3x3 filters slide over the colour image; each map lights up where its filter's pattern "
        "(an edge, a colour change, a texture) appears, and ReLU keeps only the positive responses.",
    ),
    LayerInfo(
        "conv2",
        "32 filters each combine all 32 maps of conv1, so they respond to combinations of edges and "
        "colours: corners, stripes, bits of shape.",
    ),
    LayerInfo(
        "pool",
        "2x2 max pooling keeps the strongest response of every 2x2 patch: the maps shrink to 16x16 and "
        "small shifts of the object matter less.",
    ),
    LayerInfo(
        "fc3",
        "512 units, each a weighted vote over all 8,192 pooled values; after ReLU only the units whose "
        "evidence is positive stay active.",
    ),
    LayerInfo(
        "fc4",
        "10 class scores (logits), each a weighted sum of fc3's units; softmax turns them into the "
        "probabilities shown above.",
    ),
)
LAYER_NAMES = tuple(layer.name for layer in LAYERS)
DROPOUT_NOTE = "Dropout (after conv1 and fc3 in training) is the identity at inference and has no layer of its own."


class LayerModel:
    """The companion session of one model version (CPU, one thread: a request's few images are
    tiny work, and it must not compete with the served session's threads)."""

    def __init__(self, path: Path) -> None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path.read_bytes(), sess_options=so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        names = {o.name for o in self.session.get_outputs()}
        missing = [n for n in (*LAYER_NAMES, FILTERS) if n not in names]
        if missing:
            raise ValueError(f"{path}: companion graph lacks outputs {missing}")
        self.shapes = {o.name: [d if isinstance(d, int) else -1 for d in o.shape] for o in self.session.get_outputs()}
        # The filters are weights: read once.
        self.filters = self.session.run([FILTERS], {self.input_name: np.zeros((1, 3, 32, 32), np.float32)})[0]
        self.filter_pngs = filter_images(self.filters)

    @classmethod
    def beside(cls, spec: ModelSpec) -> LayerModel | None:
        path = spec.path.with_name(LAYERS_FILENAME)
        return cls(path) if path.is_file() else None

    def run(self, x: np.ndarray, names: list[str] | tuple[str, ...] = LAYER_NAMES) -> dict[str, np.ndarray]:
        """The named activations of a float32 [n,3,32,32] (normalised) batch."""
        outputs = self.session.run(list(names), {self.input_name: x})
        return dict(zip(names, outputs))


class LayerModels:
    """The companion sessions of the model versions whose folder holds a ``layers.onnx``. Loaded
    in every process that answers requests, also a front end whose models run in a device
    executor: the layers of a request's few images are computed where the request is served."""

    def __init__(self) -> None:
        self._by_version: dict[tuple[str, str], LayerModel] = {}

    def load(self, model_repository: str) -> None:
        """Load every companion of the repository (blocking: run it in a thread). One that cannot
        be loaded is logged and left out (explanations then carry no layers); it never stops the
        server."""
        for spec in repository.scan(model_repository):
            try:
                companion = LayerModel.beside(spec)
            except Exception as e:  # noqa: BLE001 - ORT raises many types
                log.warning(
                    "%s/%s: cannot load its layers.onnx, explanations will have no layers: %s",
                    spec.name,
                    spec.version,
                    e,
                )
                continue
            if companion is not None:
                self._by_version[(spec.name, spec.version)] = companion

    def get(self, name: str, version: str) -> LayerModel | None:
        return self._by_version.get((name, version))


def png_bytes(pixels: np.ndarray) -> bytes:
    """uint8 [h,w] or [h,w,3] as PNG (fast compression: the maps are tiny)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def channel_maps(activation: np.ndarray) -> tuple[list[bytes], list[float]]:
    """[c,h,w] non-negative maps → one greyscale PNG per channel, each scaled to its own maximum
    (returned too, so a reader can compare channels' strengths); all-zero channels stay black."""
    maxima = activation.reshape(len(activation), -1).max(axis=1)
    scale = np.where(maxima > 0, 255.0 / np.maximum(maxima, 1e-12), 0.0).astype(np.float32)
    pixels = np.clip(activation * scale[:, None, None], 0, 255).astype(np.uint8)
    return [png_bytes(p) for p in pixels], maxima.astype(float).tolist()


def filter_images(filters: np.ndarray) -> list[bytes]:
    """conv1's [32,3,3,3] weights as 3x3 RGB PNGs: grey is 0, brighter/darker channels are
    positive/negative weights (each filter scaled by its largest absolute weight)."""
    peak = np.abs(filters).reshape(len(filters), -1).max(axis=1)
    scaled = filters / np.maximum(peak, 1e-12)[:, None, None, None]  # [-1, 1]
    pixels = np.clip((scaled * 0.5 + 0.5) * 255.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    return [png_bytes(p) for p in pixels]


def describe(activations: dict[str, np.ndarray], index: int, filter_pngs: list[bytes]) -> list[dict[str, Any]]:
    """The ``layers`` of one image's explanation: name, shape, description and what a page needs
    to draw it (PNG maps for the convolutional layers, values for the dense ones). PNGs are bytes;
    the HTTP answer carries them in base64."""
    out = []
    for info in LAYERS:
        a = activations[info.name][index]
        entry: dict[str, Any] = {"name": info.name, "shape": list(a.shape), "description": info.description}
        if a.ndim == 3:
            entry["maps"], entry["maxima"] = channel_maps(a)
        else:
            entry["values"] = a.astype(float).tolist()
        if info.name == "conv1":
            entry["filters"] = filter_pngs
        out.append(entry)
    return out
