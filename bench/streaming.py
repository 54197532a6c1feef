"""v2 gRPC unary calls against the same requests on streams: Triton's perf_analyzer (batch 1) at
``--concurrency`` in both modes (``--streaming``: each of its contexts keeps one ModelStreamInfer
call open), against one server, in interleaved rounds. Reports what perf_analyzer measured
(infer/s, p50) and the front ends' CPU per request (core-ms: their CPU over the requests the
server counted), the figure issue 24 is about: grpcio costs ~0.35-0.44 core-ms per call, a
message on an open stream much less.

    PA=/tmp/perf_analyzer/bin/perf_analyzer .venv/bin/python bench/streaming.py --rounds 3

perf_analyzer: ../shared/tools/setup-perf-analyzer.sh. The server runs with ``--workers 2
--executor device`` by default, so that the front ends' CPU is apart from the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402

THROUGHPUT = re.compile(r"Throughput: ([\d.]+) infer/sec")
P50 = re.compile(r"p50 latency: (\d+) usec")


def perf_analyzer(pa: str, target: str, concurrency: int, streaming: bool, interval_ms: int) -> dict[str, float]:
    cmd = [pa, "-m", "cifar10", "-u", target, "-i", "grpc", "-b", "1", "--shape", "input:3,32,32"]
    cmd += ["--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", str(interval_ms)]
    cmd += ["--stability-percentage", "999", "--max-trials", "3"]
    if streaming:
        cmd.append("--streaming")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    throughput, p50 = THROUGHPUT.search(out), P50.search(out)
    if throughput is None or p50 is None:
        raise RuntimeError(f"perf_analyzer gave no figures:\n{out[-2000:]}")
    return {"infer_per_s": float(throughput.group(1)), "p50_ms": int(p50.group(1)) / 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--interval-ms", type=int, default=3000, help="perf_analyzer's --measurement-interval")
    ap.add_argument("--server-args", default="--workers 2 --executor device")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "streaming.json"))
    args = ap.parse_args()
    pa = os.environ.get("PA", "perf_analyzer")
    server = ServerProcess(*args.server_args.split(), "--drain-seconds", "0")
    rows: list[dict] = []
    try:
        for round_ in range(args.rounds):
            modes = [False, True] if round_ % 2 == 0 else [True, False]
            for streaming in modes:
                cpu, served = server.cpu_by_role(), server.requests_served()
                figures = perf_analyzer(pa, server.grpc_target, args.concurrency, streaming, args.interval_ms)
                cpu_after, served_after = server.cpu_by_role(), server.requests_served()
                requests = served_after - served
                role = "front end" if "front end" in cpu else "process"
                row = {
                    "round": round_,
                    "mode": "streaming" if streaming else "unary",
                    **figures,
                    "requests": requests,
                    "front_end_core_ms_per_request": round(1000 * (cpu_after[role] - cpu[role]) / requests, 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.stop()
    summary = {}
    for mode in ("unary", "streaming"):
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            key: {"min": min(r[key] for r in mine), "median": statistics.median(r[key] for r in mine)}
            for key in ("infer_per_s", "p50_ms", "front_end_core_ms_per_request")
        }
    ratio = (
        summary["streaming"]["front_end_core_ms_per_request"]["median"]
        / summary["unary"]["front_end_core_ms_per_request"]["median"]
    )
    print(
        f"front-end core-ms per request, median: unary {summary['unary']['front_end_core_ms_per_request']['median']}"
        f", streaming {summary['streaming']['front_end_core_ms_per_request']['median']} ({ratio:.2f}x)"
    )
    Path(args.json).write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "machine": machine_info(), "rows": rows, "summary": summary}, indent=1
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
