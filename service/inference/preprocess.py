"""The model's preprocessing, written once: decoded uint8 images → the float32 tensor the model takes.

A model's ONNX metadata key ``preprocessing`` holds a JSON object (the contract is in
docs/models.md)::

    {"scale": 0.00392156862745098, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
     "layout": "NCHW", "color": "RGB", "size": [32, 32]}

and each channel of the input is ``(pixel * scale - mean) / std``, in ``color`` order, at ``size``
(height, width) after the server's centre crop and resize (``service.inference.codec``).

Everyone who turns images into that tensor uses this module: the server (``Normalizer``, over a
whole batch at once), ``export/train.py`` and ``export/evaluate.py`` (``normalize``), and Open
Inference Protocol clients (``image_to_tensor``: bytes → the exact tensor the server computes for
them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.inference import codec

LAYOUTS = ("NCHW",)
COLORS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocessing:
    """A model's preprocessing. ``size`` is (height, width); ``mean``/``std`` are per channel, in
    ``color`` order, on the scaled values (0-1 with ``scale`` 1/255)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1 / 255
    size: tuple[int, int] = (codec.SIZE, codec.SIZE)
    color: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"preprocessing needs 3 mean and 3 std values (one per channel), got {self}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"preprocessing std values must be > 0, got {list(self.std)}")
        if not self.scale > 0:
            raise ValueError(f"preprocessing scale must be > 0, got {self.scale}")
        if len(self.size) != 2 or not all(isinstance(v, int) and v > 0 for v in self.size):
            raise ValueError(f"preprocessing size must be [height, width] in pixels, got {list(self.size)}")
        if self.color not in COLORS:
            raise ValueError(f"preprocessing color must be one of {', '.join(COLORS)}, got {self.color!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"preprocessing layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")

    @classmethod
    def parse(cls, value: Preprocessing | Mapping[str, Any]) -> Preprocessing:
        """From the metadata's JSON object (a dict); missing optional keys take the defaults
        above. Raises ValueError naming what is wrong."""
        if isinstance(value, Preprocessing):
            return value
        if not isinstance(value, Mapping) or "mean" not in value or "std" not in value:
            raise ValueError(f'preprocessing must be a JSON object with "mean" and "std" at least, got {value!r}')
        unknown = set(value) - {"mean", "std", "scale", "size", "color", "layout"}
        if unknown:
            raise ValueError(f"preprocessing has unknown keys {sorted(unknown)}")
        try:
            return cls(
                mean=tuple(float(v) for v in value["mean"]),
                std=tuple(float(v) for v in value["std"]),
                scale=float(value.get("scale", 1 / 255)),
                size=tuple(int(v) for v in value.get("size", (codec.SIZE, codec.SIZE))),  # type: ignore[arg-type]
                color=str(value.get("color", "RGB")).upper(),
                layout=str(value.get("layout", "NCHW")).upper(),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"preprocessing {dict(value)!r} is malformed: {e}") from None

    def to_metadata(self) -> dict[str, Any]:
        """The JSON object for the model's ``preprocessing`` metadata."""
        return {
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "color": self.color,
            "size": list(self.size),
        }


class Normalizer:
    """uint8 NHWC RGB images → the model's float32 NCHW input, ``(x * scale - mean) / std`` per
    channel, folded at start-up into one multiply-add over the whole batch (the served hot path)."""

    def __init__(self, preprocessing: Preprocessing | Mapping[str, Any]) -> None:
        pre = Preprocessing.parse(preprocessing)
        mean_a, std_a = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
        # Decoded pixels are RGB; a BGR model gets its channels reversed, so mean/std (given in
        # the model's order) are reversed to RGB order here and the output's channels at the end.
        if pre.color == "BGR":
            mean_a, std_a = mean_a[::-1], std_a[::-1]
        self.bgr = pre.color == "BGR"
        self.mul = (pre.scale / std_a).astype(np.float32)
        self.add = (-mean_a / std_a).astype(np.float32)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32)
        x *= self.mul
        x += self.add
        nchw = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(nchw[:, ::-1] if self.bgr else nchw)


def normalize(images: np.ndarray, preprocessing: Preprocessing | Mapping[str, Any]) -> np.ndarray:
    """uint8 [n,H,W,3] RGB images (already at the model's size) → float32 [n,3,H,W] model input."""
    return Normalizer(preprocessing)(images)


def image_to_tensor(
    data: bytes, preprocessing: Preprocessing | Mapping[str, Any], max_pixels: int = 1 << 30
) -> np.ndarray:
    """An encoded image (JPEG, PNG or any format Pillow reads) → float32 [1,3,H,W]: exactly the
    tensor the server computes for it (same decoder, centre crop and resize, same arithmetic), for
    Open Inference Protocol clients that send tensors. ``preprocessing`` is the model's
    ``preprocessing`` metadata (a dict, as in the model configuration's parameters)."""
    pre = Preprocessing.parse(preprocessing)
    return normalize(codec.decode_image(data, max_pixels, pre.size)[None], pre)
