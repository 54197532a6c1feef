"""/predict latency alone and while clients loop on /explain (issue 18: explanations starved
predictions through the shared queue). One sequential /predict caller; then the same with
``--explainers`` clients each looping on a 4-image /explain, in a process of their own (so their
response parsing does not hold the /predict caller's GIL). Each round starts a fresh server per
tree, alone then loaded; rounds alternate trees, so trees are compared side by side. Prints one
JSON line per round and tree, then min/median over rounds of p50 and p99 per phase, and where
the time went: the server's own /predict time (``cnnserve_request_duration_seconds``: the loaded
phase's mean, and the histogram bucket each phase's p99 fell in) and each role's CPU seconds
over the loaded phase.

    .venv/bin/python bench/explain_isolation.py                               # this tree, ~1 min
    .venv/bin/python bench/explain_isolation.py --cwd ../main --cwd .  --rounds 3  # side by side
    .venv/bin/python bench/explain_isolation.py --workers 1 --executor worker  # one process
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import re
import shlex
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

PREDICT_DURATION = re.compile(
    r'^cnnserve_request_duration_seconds_(sum|count)\{method="predict",protocol="http"\} ([0-9.e+]+)$', re.M
)
PREDICT_BUCKET = re.compile(
    r'^cnnserve_request_duration_seconds_bucket\{le="([0-9.e+]+|\+Inf)",method="predict",protocol="http"\} '
    r"([0-9.e+]+)$",
    re.M,
)


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


def _explainers(url: str, count: int, stop, explained) -> None:
    """``count`` threads looping on a 4-image /explain until ``stop`` is set (a process of its own)."""

    def loop(seed: int) -> None:
        with httpx.Client(timeout=60) as client:
            files = [("file", (f"{i}.png", _png(seed * 10 + i), "image/png")) for i in range(4)]
            while not stop.is_set():
                if client.post(f"{url}/explain", files=files).status_code == 200:
                    with explained.get_lock():
                        explained.value += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _summary(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100)
    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "p99_ms": round(q[98], 1)}


def _server_predict(s: ServerProcess) -> tuple[float, float, dict[str, float]]:
    """(sum of seconds, count, cumulative count by bucket) of the server's HTTP /predict durations so far."""
    text = httpx.get(f"{s.http}/metrics").text
    found = dict(PREDICT_DURATION.findall(text))
    buckets = {le: float(n) for le, n in PREDICT_BUCKET.findall(text)}
    return float(found.get("sum", 0)), float(found.get("count", 0)), buckets


def _server_p99_ms(before: dict[str, float], after: dict[str, float]) -> str:
    """The histogram bucket the server's own p99 /predict time fell in, over a phase ("<= 25 ms")."""
    edges = sorted((float(le), le) for le in after if le != "+Inf")
    total = after.get("+Inf", 0.0) - before.get("+Inf", 0.0)
    for edge, le in edges:
        if total and after[le] - before.get(le, 0.0) >= 0.99 * total:
            return f"<= {edge * 1000:g} ms"
    return f"> {edges[-1][0] * 1000:g} ms" if edges else "?"


def one_round(tree: str, args: argparse.Namespace) -> dict:
    s = ServerProcess("--workers", args.workers, "--executor", args.executor, "--drain-seconds", "0",
                      "--precision", "fp32", *shlex.split(args.serve), cwd=tree)  # fmt: skip
    try:
        _predict_latencies(s.http, 1.0)  # warm-up
        alone_before = _server_predict(s)
        alone = _predict_latencies(s.http, args.seconds)
        alone_after = _server_predict(s)
        spawn = multiprocessing.get_context("spawn")
        stop, explained = spawn.Event(), spawn.Value("i", 0)
        clients = spawn.Process(target=_explainers, args=(s.http, args.explainers, stop, explained))
        clients.start()
        time.sleep(2.0)  # the explanations' queue fills
        cpu_before, server_before = s.cpu_by_role(), _server_predict(s)
        loaded = _predict_latencies(s.http, args.seconds)
        cpu_after, server_after = s.cpu_by_role(), _server_predict(s)
        stop.set()
        clients.join(60)
        seconds, count = server_after[0] - server_before[0], server_after[1] - server_before[1]
        return {"tree": tree, "alone": _summary(alone), "with_explain": _summary(loaded),
                "explanations": explained.value,
                "server_predict_mean_ms": round(1000 * seconds / max(count, 1), 1),
                "server_p99_alone": _server_p99_ms(alone_before[2], alone_after[2]),
                "server_p99_with_explain": _server_p99_ms(server_before[2], server_after[2]),
                "cpu_s_loaded": {role: round(cpu_after[role] - cpu_before.get(role, 0.0), 1) for role in cpu_after},
                }  # fmt: skip
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cwd", action="append", help="source tree to serve (repeat to compare; default: this one)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--explainers", type=int, default=4)
    ap.add_argument("--workers", default="2")
    ap.add_argument("--executor", default="device")
    ap.add_argument("--serve", default="", help="more `serve` flags for every tree, one string")
    args = ap.parse_args()
    trees = args.cwd or [str(ROOT)]
    rounds: dict[str, list[dict]] = {tree: [] for tree in trees}
    for _ in range(args.rounds):
        for tree in trees:
            result = one_round(tree, args)
            rounds[tree].append(result)
            print(json.dumps(result), flush=True)
    for tree, results in rounds.items():
        summary = {"tree": tree, "workers": args.workers, "executor": args.executor, "rounds": len(results)}
        for phase in ("alone", "with_explain"):
            for key in ("p50_ms", "p99_ms"):
                values = [r[phase][key] for r in results]
                summary[f"{phase}_{key}"] = {"min": min(values), "median": statistics.median(values)}
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
