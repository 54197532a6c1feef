"""/predict latency alone and while clients loop on /explain (issue: explanations starved
predictions through the shared queue). One sequential /predict caller; then the same with
``--explainers`` threads each looping on a 4-image /explain. Prints p50 / p99 per phase.

    .venv/bin/python bench/explain_isolation.py                    # this tree, ~30 s
    .venv/bin/python bench/explain_isolation.py --cwd ../main      # another checkout, to compare
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _predict_latencies(url: str, seconds: float) -> list[float]:
    out = []
    until = time.monotonic() + seconds
    with httpx.Client(timeout=30) as client:
        while time.monotonic() < until:
            started = time.perf_counter()
            r = client.post(f"{url}/predict", content=_png(1), headers={"Content-Type": "image/png"})
            out.append((time.perf_counter() - started) * 1000)
            r.raise_for_status()
    return out


def _summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(q[98], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cwd", default=str(ROOT), help="source tree to serve")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--explainers", type=int, default=4)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--executor", default="device")
    args = ap.parse_args()
    s = ServerProcess("--workers", args.workers, "--executor", args.executor, "--drain-seconds", "0",
                      "--precision", "fp32", cwd=args.cwd)  # fmt: skip
    try:
        _predict_latencies(s.http, 1.0)  # warm-up
        alone = _predict_latencies(s.http, args.seconds)
        stop = threading.Event()
        explained = [0]

        def explain_loop(seed: int) -> None:
            with httpx.Client(timeout=60) as client:
                files = [("file", (f"{i}.png", _png(seed * 10 + i), "image/png")) for i in range(4)]
                while not stop.is_set():
                    r = client.post(f"{s.http}/explain", files=files)
                    if r.status_code == 200:
                        explained[0] += 1

        threads = [threading.Thread(target=explain_loop, args=(i,)) for i in range(args.explainers)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        loaded = _predict_latencies(s.http, args.seconds)
        stop.set()
        for t in threads:
            t.join(60)
        result = {"tree": args.cwd, "alone": _summary(alone), "with_explain": _summary(loaded),
                  "explanations": explained[0]}  # fmt: skip
        print(json.dumps(result))
    finally:
        s.stop()


if __name__ == "__main__":
    main()
