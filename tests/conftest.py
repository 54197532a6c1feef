"""Shared test fixtures: a real cnnserve server process on 127.0.0.1 with ephemeral ports
(started by bench/serverproc.py, which the benchmarks use too)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench import serverproc

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "models"
MODEL_PATH = MODEL_REPOSITORY / "cifar10" / "1" / "model.onnx"
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-train-jpeg.tar.gz"


#: The server suite runs once as one process (the default here) and once with several front ends
#: and a device executor: `.ci/run` sets CNNSERVE_TEST_WORKERS=2 for the second run.
TEST_WORKERS = os.environ.get("CNNSERVE_TEST_WORKERS", "1")
TEST_EXECUTOR = os.environ.get("CNNSERVE_TEST_EXECUTOR", "worker" if TEST_WORKERS == "1" else "device")


class ServerProcess(serverproc.ServerProcess):
    """``cnnserve serve`` in a subprocess (bench/serverproc.py) with the tests' defaults: one
    intra-op thread, so servers started side by side share a small machine; ``wait_ready=False``
    returns once it listens. ``--workers``/``--executor`` come from CNNSERVE_TEST_WORKERS/_EXECUTOR
    unless ``args`` set them."""

    def __init__(
        self,
        *args: str,
        env: dict | None = None,
        wait_ready: bool = True,
        timeout: float = 60,
        precision: str | None = "fp32",
    ) -> None:
        # fp32 unless asked: most tests compare answers with a direct run of model.onnx. None: the
        # server's default (auto); tests/test_variants.py serves every variant.
        super().__init__(
            "--intra-op-threads",
            "1",
            *(["--precision", precision] if precision else []),
            *([] if "--workers" in args else ["--workers", TEST_WORKERS, "--executor", TEST_EXECUTOR]),
            *args,
            env=env,
            wait="ready" if wait_ready else "listening",
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def server():
    """The default server on the bundled model, shared by every test that only reads from it."""
    s = ServerProcess("--drain-seconds", "0")
    yield s
    assert s.stop() == 0, s.log


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def distinct_images(n: int, seed: int = 0) -> np.ndarray:
    """n different 32x32 RGB images: smooth colour fields, so the model gives varied answers."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    out = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = a[None, None, :] * (1 - yy[..., None]) + b[None, None, :] * xx[..., None] + c * 0.3
        img += rng.normal(0, 25, (32, 32, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="session")
def cifar_val_sample():
    """50 real CIFAR-10 validation images and labels (skipped where the shared data is absent)."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"CIFAR-10 images not present at {SHARED_CIFAR}")
    from export.data import load_split

    ds = load_split(SHARED_CIFAR, "val")
    idx = np.random.default_rng(0).choice(len(ds), 50, replace=False)
    return ds.images[idx], ds.labels[idx], ds.classes


def wait_until(predicate, timeout: float = 10, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
