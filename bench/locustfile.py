"""Locust user for cnnserve's HTTP /predict: one generated 32x32 JPEG per request, image/jpeg body.

Locust is not a project dependency (it brings gevent, Flask, pyzmq, ...); install it where you
run it, for example in a separate virtual environment::

    python3 -m venv /tmp/locust && /tmp/locust/bin/pip install locust==2.47.0
    /tmp/locust/bin/locust -f bench/locustfile.py --host http://127.0.0.1:8000 \\
        --headless --users 64 --spawn-rate 64 --run-time 30s --csv /tmp/locust-predict

Every user sends its next request as soon as the last is answered (``wait_time = constant(0)``),
so ``--users N`` is a closed loop of N callers, like ``cnnserve loadtest --target http -c N``.
Locust's per-request Python cost is much higher than ``cnnserve loadtest``'s, so on a few cores
it measures the client sooner than the server; use it for its web UI and ramp-ups, and
``cnnserve loadtest`` for throughput figures.

Environment: ``LOCUST_IMAGES=DIR`` sends the JPEG/PNG files of DIR (round-robin) instead of the
generated images; ``LOCUST_TOP_K=K`` asks for K labels per image.
"""

from __future__ import annotations

import base64
import io
import itertools
import os
import random
from pathlib import Path

try:
    from locust import FastHttpUser, constant, task
except ImportError:  # importable without locust (syntax checks, test collection); unusable
    FastHttpUser = object  # type: ignore[assignment,misc]

    def constant(seconds):  # type: ignore[no-redef]
        return None

    def task(fn):  # type: ignore[no-redef]
        return fn


# A 32x32 JPEG (smooth colours plus noise), used when Pillow is not installed where Locust runs.
FALLBACK_JPEG = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAgGBgcGBQgHBwcJCQgKDBQNDAsLDBkSEw8UHRofHh0aHBwgJC4nICIsIxwcKDcp"
    "LDAxNDQ0Hyc5PTgyPC4zNDL/2wBDAQkJCQwLDBgNDRgyIRwhMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIyMjIy"
    "MjIyMjIyMjIyMjIyMjL/wAARCAAgACADAREAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAAAAECAwQFBgcICQoL/8QAtRAA"
    "AgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAkM2JyggkKFhcYGRolJicoKSo0NTY3ODk6"
    "Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKTlJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXG"
    "x8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QAHwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREA"
    "AgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdhcRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5"
    "OkNERUZHSElKU1RVVldYWVpjZGVmZ2hpanN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPE"
    "xcbHyMnK0tPU1dbX2Nna4uPk5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwDu4tRV23IvXrt5Jxj8a2pLS8v6vf8AT/gd"
    "zwXBz902IbwmTbyeSoy2DXWoqxNk1dK/4fLzLkN2HTCvuYD7xPXoM0pU7bhzSV7L+v61LaTZA4BHXrnBzWLiaKq+2h5BDqBe"
    "Qh9nK7jn0HfgVlh5ckbrT+v6WpsrPS97O39a6G5b6kJ4CNyblA+fpgdPzr1aa5Wl/wAH+u3cy5XFXt6/189exrW982wOxOCu"
    "VLL0/Dr/AJ+launfYwlJXS6/0vw8vzNY3wjPlKc4JyBzx2Of8feuZUr6smN1G72/r8fzPBLHU9uS2OW4O4Atz3/z29jXDCb0"
    "i9PTY9Z0uayv27m/a6iETeGIX7p2uRj+vr19jXowdppW/wA2c1SPW11/wxtWF8sfIZmkU4Knpk9v0PP0r0YxurPb+vJHPNpJ"
    "paf1/X6mzb30Yi3FtoU8sCMep47DH4U50nexg1eXL/X9dt/xPni01MiEfNyR/CeV+or52k1zf1/X4v5HvuFm2jpLTVPNlBcl"
    "nA5bIXAPUEfTA969SjDey0/4bucDjNO39f1v/wAOdBY6oHIUcSYBGWJx7YH1r0acbe9LY5qvNF81v6/r+rG/BqBCqzAqo6AL"
    "k8Y6npiu32Se2pxyhpe+3p6N+fp1P//Z"
)


def _generated(n: int = 64, seed: int = 0) -> list[bytes]:
    """n random 32x32 JPEGs: colour gradients plus noise, encoded once with Pillow."""
    try:
        from PIL import Image
    except ImportError:
        return [FALLBACK_JPEG]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a = [rng.uniform(0, 255) for _ in range(3)]
        b = [rng.uniform(0, 255) for _ in range(3)]
        pixels = bytearray()
        for y in range(32):
            for x in range(32):
                for ch in range(3):
                    v = a[ch] * (1 - y / 31) + b[ch] * (x / 31) + rng.gauss(0, 20)
                    pixels.append(max(0, min(255, int(v))))
        buf = io.BytesIO()
        Image.frombytes("RGB", (32, 32), bytes(pixels)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _images() -> list[tuple[bytes, str]]:
    folder = os.environ.get("LOCUST_IMAGES")
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise SystemExit(f"LOCUST_IMAGES={folder}: no .jpg/.jpeg/.png files")
        return [(p.read_bytes(), "image/png" if p.suffix.lower() == ".png" else "image/jpeg") for p in files[:4096]]
    return [(data, "image/jpeg") for data in _generated()]


IMAGES = _images()
TOP_K = os.environ.get("LOCUST_TOP_K")
PATH = "/predict" + (f"?top_k={TOP_K}" if TOP_K else "")


class PredictUser(FastHttpUser):
    """POST /predict with one image; a 200 without one result per image counts as a failure."""

    wait_time = constant(0)

    def on_start(self) -> None:
        start = random.randrange(len(IMAGES))
        self._images = itertools.islice(itertools.cycle(IMAGES), start, None)

    @task
    def predict(self) -> None:
        data, content_type = next(self._images)
        with self.client.post(
            PATH, data=data, headers={"Content-Type": content_type}, name="/predict", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                results = response.json()["results"]
            except (ValueError, KeyError, TypeError) as e:
                response.failure(f"unexpected answer: {type(e).__name__}: {e}")
                return
            if len(results) != 1:
                response.failure(f"{len(results)} results for 1 image")
            else:
                response.success()
