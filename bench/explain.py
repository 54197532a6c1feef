"""/explain latency and the attribution's faithfulness (the deletion test), for docs/benchmarks.md.

1. Latency: starts a server (subprocess, 127.0.0.1, CPU provider; with ``--cpus 0,1`` pinned to
   two cores by taskset, its intra-op threads one per core minus one as by default) and sends
   ``--requests`` sequential single-image HTTP /explain requests per method (held-out samples
   when the data is present, else drawn images), after a warm-up; prints min / p50 / p90 / max
   in ms. Target: occlusion p50 <= 100 ms on 2 cores.
2. Deletion test, in this process on the same model (onnxruntime, 1 thread): for ``--images``
   held-out validation images, the explained (top-1) class's mean probability on the image, with
   its most-attributed quarter of pixels deleted (set to the training mean colour) and with a
   random quarter deleted; and how often the attributed deletion hurt more.

    .venv/bin/python bench/explain.py --cpus 0,1          # the docs' figures (about a minute)
    .venv/bin/python bench/explain.py --smoke             # seconds: 3 requests, 5 images

Writes bench/results/explain.json (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402
from service.explain import attribution  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10" / "cifar10-train-jpeg.tar.gz"


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def held_out_images(data: Path, n: int, seed: int = 0) -> np.ndarray | None:
    if not data.exists():
        return None
    from export.data import load_split

    ds = load_split(data, "val")
    return ds.images[np.random.default_rng(seed).choice(len(ds), n, replace=False)]


def drawn_images(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    base = (
        rng.uniform(0, 255, (n, 1, 1, 3)) * yy[None, ..., None]
        + rng.uniform(0, 255, (n, 1, 1, 3)) * xx[None, ..., None]
    )
    return np.clip(base + rng.normal(0, 20, (n, 32, 32, 3)), 0, 255).astype(np.uint8)


def latency(server: ServerProcess, images: list[bytes], method: str, requests: int, warmup: int) -> dict:
    def one(body: bytes) -> float:
        req = urllib.request.Request(
            f"{server.http}/explain?method={method}", data=body, headers={"Content-Type": "image/png"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            if r.status != 200:
                raise RuntimeError(f"/explain answered {r.status}")
        return (time.perf_counter() - started) * 1000.0

    for i in range(warmup):
        one(images[i % len(images)])
    times = sorted(one(images[i % len(images)]) for i in range(requests))
    return {
        "requests": requests,
        "min_ms": times[0],
        "p50_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "max_ms": times[-1],
    }


def deletion_test(images: np.ndarray, methods: list[str], fraction: float) -> dict:
    from service.inference.repository import scan
    from service.inference.runtime import ModelRuntime
    from service.settings import Settings

    runtime = ModelRuntime(scan(ROOT / "models")[0], Settings(providers=["cpu"], intra_op_threads=1))
    fill = attribution.fill_colour(runtime.preprocessing)
    out = {}
    for method in methods:
        rows = []
        for image in images:
            batch, plan = attribution.perturb(image, fill, method)
            probs = runtime.run_batch([batch]).probabilities
            target = int(probs[0].argmax())
            values = attribution.attribute(plan, probs, target)
            deleted = runtime.run_batch([attribution.deletion_images(image, values, fill, fraction)]).probabilities
            rows.append((probs[0, target], deleted[0, target], deleted[1, target]))
        r = np.array(rows, np.float64)
        out[method] = {
            "images": len(r),
            "probability": r[:, 0].mean(),
            "top_deleted": r[:, 1].mean(),
            "random_deleted": r[:, 2].mean(),
            "top_hurts_more_share": float((r[:, 1] < r[:, 2]).mean()),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpus", default=None, help="taskset list for the server, e.g. 0,1 (default: not pinned)")
    ap.add_argument("--requests", type=int, default=200, help="measured requests per method (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests per method (default 20)")
    ap.add_argument("--images", type=int, default=500, help="held-out images for the deletion test (default 500)")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of pixels deleted (default 0.25)")
    ap.add_argument("--methods", default=",".join(attribution.METHODS), help="comma-separated (default all)")
    ap.add_argument("--data", type=Path, default=DATA, help=f"CIFAR-10 archive (default {DATA})")
    ap.add_argument("--smoke", action="store_true", help="3 requests, 1 warm-up, 5 images: checks the script runs")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "explain.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.warmup, args.images = 3, 1, 5
    methods = args.methods.split(",")

    real = held_out_images(args.data, max(args.images, 10))
    pool = real if real is not None else drawn_images(max(args.images, 10))
    source = "held-out CIFAR-10 validation images" if real is not None else "drawn images (no CIFAR-10 data found)"

    server = ServerProcess("--drain-seconds", "0", cpus=args.cpus)
    try:
        bodies = [_png(p) for p in pool[:10]]
        timings = {m: latency(server, bodies, m, args.requests, args.warmup) for m in methods}
    finally:
        server.stop()
    for m, t in timings.items():
        print(
            f"/explain {m:9s} 1 image: p50 {t['p50_ms']:.1f} ms  p90 {t['p90_ms']:.1f}  min {t['min_ms']:.1f}  "
            f"max {t['max_ms']:.1f}  ({t['requests']} requests, server cpus {args.cpus or 'all'})"
        )
    faithfulness = deletion_test(pool[: args.images], methods, args.fraction)
    for m, f in faithfulness.items():
        print(
            f"deletion test {m:9s} on {f['images']} {source}: p(class) {f['probability']:.3f} -> "
            f"{f['top_deleted']:.3f} with the most-attributed {args.fraction:.0%} deleted, "
            f"{f['random_deleted']:.3f} with a random {args.fraction:.0%}; attributed deletion hurt more on "
            f"{f['top_hurts_more_share']:.0%} of images"
        )
    result = {
        "machine": machine_info(),
        "server_cpus": args.cpus,
        "source": source,
        "latency": timings,
        "deletion_test": {"fraction": args.fraction, **faithfulness},
        "target_p50_ms": 100.0,
        "target_met": timings.get("occlusion", {}).get("p50_ms", float("inf")) <= 100.0,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
