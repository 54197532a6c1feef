"""Model-agnostic attribution: which pixels the explained class's probability depends on.

Both methods only perturb the input and read the model's probabilities, so their perturbed
images go through the same batcher and runtime as every request (CPU or GPU alike). Each is
split in two pure steps around that one batched run:

- ``perturb(image, fill)`` → (the uint8 images to run, a plan); the first image is always the
  unperturbed one, so its prediction (the default target) comes from the same batch;
- ``attribute(plan, probabilities, target)`` → a float32 [H,W] map (the model's input size), positive where hiding the
  pixels lowers the target's probability.

Methods (forward passes per image, with the defaults):

- ``occlusion`` (default, 226 passes): a 4x4 square of the fill colour slides with stride 2 over
  the 32x32 image (for other input sizes the square is 1/8 of the larger side, the stride half of
  it, so the count stays about the same); each pixel's value is the mean drop of the target's
  probability over the squares that cover it (Zeiler & Fergus, 2014). Deterministic, no seed
  needed; sharp but only as local as the square.
- ``rise`` (256 passes): 255 random masks, each a coarse 4x4 grid of kept/hidden cells (half kept)
  upsampled smoothly with a random shift; each pixel's value is the probability-weighted mean of the
  masks that keep it, minus the mean probability (Petsiuk et al., 2018). Deterministic for a given
  seed; smoother, sees interactions between distant regions, noisier at this count.

The hidden pixels take the fill colour, the training set's mean, i.e. zero after normalisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from service.inference.preprocess import Preprocessing

METHODS = ("occlusion", "rise")
DEFAULT_METHOD = "occlusion"
OCCLUSION_SQUARES = 8  # the square is 1/8 of the image's larger side (4 pixels at 32x32)
RISE_MASKS = 255
RISE_GRID = 4
RISE_KEEP = 0.5
DEFAULT_SEED = 0


@dataclass(frozen=True)
class Plan:
    method: str
    masks: np.ndarray  # float32 [m,H,W]: 1 where the pixel is kept, 0 where hidden (row 0 excluded)


def fill_colour(preprocessing: Mapping[str, Any]) -> np.ndarray:
    """The training mean as a uint8 RGB colour (zero after the model's normalisation), from the
    model's preprocessing (``service.inference.preprocess``; its mean is in the model's colour order)."""
    pre = Preprocessing.parse(preprocessing)
    rgb = pre.mean if pre.color == "RGB" else pre.mean[::-1]
    return np.clip(np.round(np.asarray(rgb, np.float64) / pre.scale), 0, 255).astype(np.uint8)


@lru_cache(maxsize=4)
def occlusion_masks(height: int, width: int) -> np.ndarray:
    patch = max(2, max(height, width) // OCCLUSION_SQUARES)
    stride = max(1, patch // 2)
    ys = range(0, max(height - patch, 0) + 1, stride)
    xs = range(0, max(width - patch, 0) + 1, stride)
    masks = np.ones((len(ys) * len(xs), height, width), np.float32)
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        masks[i, y : y + patch, x : x + patch] = 0.0
    masks.setflags(write=False)
    return masks


def _bilinear_matrix(cells: int, size: int) -> np.ndarray:
    """[size, cells] weights that upsample ``cells`` samples to ``size`` (align-corners bilinear)."""
    pos = np.linspace(0, cells - 1, size)
    low = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = pos - low
    w = np.zeros((size, cells), np.float32)
    w[np.arange(size), low] = 1 - frac
    w[np.arange(size), low + 1] = frac
    return w


@lru_cache(maxsize=8)
def rise_masks(
    seed: int = DEFAULT_SEED,
    height: int = 32,
    width: int = 32,
    n: int = RISE_MASKS,
    grid: int = RISE_GRID,
    keep: float = RISE_KEEP,
) -> np.ndarray:
    """``n`` smooth random masks [n,H,W] in [0,1], the same for the same arguments."""
    rng = np.random.default_rng(seed)
    cell_h, cell_w = -(-height // grid), -(-width // grid)
    cells = (rng.random((n, grid + 1, grid + 1)) < keep).astype(np.float32)
    up = np.einsum(
        "yi,nij,xj->nyx",
        _bilinear_matrix(grid + 1, (grid + 1) * cell_h),
        cells,
        _bilinear_matrix(grid + 1, (grid + 1) * cell_w),
    )
    dy, dx = rng.integers(0, cell_h, n), rng.integers(0, cell_w, n)
    rows = dy[:, None] + np.arange(height)[None, :]
    cols = dx[:, None] + np.arange(width)[None, :]
    masks = up[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32)
    masks.setflags(write=False)
    return masks


def perturb(
    image: np.ndarray, fill: np.ndarray, method: str = DEFAULT_METHOD, seed: int = DEFAULT_SEED
) -> tuple[np.ndarray, Plan]:
    """(uint8 [1+m,H,W,3] images to run, the plan): the image itself, then its perturbations."""
    height, width = image.shape[:2]
    if method == "occlusion":
        masks = occlusion_masks(height, width)
    elif method == "rise":
        masks = rise_masks(seed, height, width)
    else:
        raise ValueError(f"unknown method {method!r}")
    m = masks[:, :, :, None]
    perturbed = image[None].astype(np.float32) * m + fill.astype(np.float32) * (1.0 - m)
    batch = np.empty((1 + len(masks), height, width, 3), np.uint8)
    batch[0] = image
    np.rint(perturbed, out=perturbed)
    batch[1:] = perturbed
    return batch, Plan(method, masks)


def attribute(plan: Plan, probabilities: np.ndarray, target: int) -> np.ndarray:
    """float32 [H,W] attribution of ``target`` from the batch's probabilities [1+m, classes]."""
    p = probabilities[:, target].astype(np.float32)
    hidden = 1.0 - plan.masks
    if plan.method == "occlusion":
        drop = p[0] - p[1:]
        cover = hidden.sum(axis=0)
        return np.einsum("m,myx->yx", drop, hidden) / np.maximum(cover, 1.0)
    kept = plan.masks
    centred = p[1:] - p[1:].mean()
    return np.einsum("m,myx->yx", centred, kept) / np.maximum(kept.sum(axis=0), 1e-6)


# ---- faithfulness ---------------------------------------------------------------------------------
def delete_pixels(image: np.ndarray, order: np.ndarray, fraction: float, fill: np.ndarray) -> np.ndarray:
    """``image`` with the first ``fraction`` of the flat pixel indices in ``order`` set to ``fill``."""
    count = round(fraction * image.shape[0] * image.shape[1])
    out = image.copy().reshape(-1, 3)
    out[order[:count]] = fill
    return out.reshape(image.shape)


def deletion_images(
    image: np.ndarray, attribution: np.ndarray, fill: np.ndarray, fraction: float = 0.25, seed: int = 0
) -> np.ndarray:
    """uint8 [2,H,W,3]: the image with its most-attributed ``fraction`` of pixels deleted, and
    with a random ``fraction`` deleted (seeded): the deletion test's two inputs."""
    top = np.argsort(-attribution.reshape(-1), kind="stable")
    random = np.random.default_rng(seed).permutation(attribution.size)
    return np.stack([delete_pixels(image, top, fraction, fill), delete_pixels(image, random, fraction, fill)])
