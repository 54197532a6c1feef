"""Softmax and top-k over a whole batch of logits (numpy, no per-image Python)."""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits. float32 in, float32 out."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def ranking(probabilities: np.ndarray) -> np.ndarray:
    """Class indices of every row, most probable first (ties: lower index first).

    Sorting all 10 classes once per batch costs the same as a partition and lets every request
    take its own top_k as a slice."""
    return np.argsort(-probabilities, axis=1, kind="stable")


def top_k(probabilities: np.ndarray, order: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n,k], probabilities [n,k]) of the k most probable classes of each row."""
    idx = order[:, :k]
    return idx, np.take_along_axis(probabilities, idx, axis=1)
