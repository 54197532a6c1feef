"""Shared test fixtures: a real cnnserve server process on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = ROOT / "models"
MODEL_PATH = MODEL_REPOSITORY / "cifar10" / "1" / "model.onnx"
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-train-jpeg.tar.gz"
LISTENING = re.compile(r"listening http=(\S+):(\d+) grpc=(\S+):(\d+)")


class ServerProcess:
    """``cnnserve serve`` in a subprocess; stderr is collected so tests can read the logs."""

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
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--providers",
            "cpu",
            "--intra-op-threads",
            "1",
            "--model-repository",
            str(MODEL_REPOSITORY),
            *(["--precision", precision] if precision else []),
            *args,
        ]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._listening = threading.Event()
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._listening.wait(timeout):
            self.stop()
            raise RuntimeError("server did not start listening:\n" + self.log)
        if wait_ready:
            self.wait_ready(timeout)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = LISTENING.search(line)
            if m:
                self.http_port, self.grpc_port = int(m.group(2)), int(m.group(4))
                self._listening.set()
            if " ready in " in line:
                self._ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError("server did not become ready:\n" + self.log)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
