"""--workers side by side: one process vs several front ends (models in each, or one device
executor) vs auto, in one run, under the same load, with each process's CPU cost per request.

Servers (CPU provider, all started first and kept running; idle ones cost nothing):
  1        --workers 1 --executor worker    (one process: today's server)
  2-worker --workers 2 --executor worker    (two processes, each with its own session and queue)
  2-device --workers 2 --executor device    (two front ends, one device executor)
  auto     --workers auto --executor auto   (what auto picks on this machine)

Loads, rotating from round to round: ``cnnserve loadtest`` (gRPC Classify c=1 and c=64, HTTP
/predict c=64, one image a request), and Triton's perf_analyzer (Open Inference Protocol gRPC,
batch 1, c=1 and c=64) where it is installed (../shared/tools/setup-perf-analyzer.sh; found at
$PA_ROOT/bin/perf_analyzer, default /tmp/perf_analyzer).

For every point: images/s and p50 (min / median over rounds), the ratio to ``1`` measured in the
same round, and CPU milliseconds per request of each role (from /proc: front ends, executor, or
the one process) — the inputs of the throughput model in docs/benchmarks.md.

    .venv/bin/python bench/workers.py                 # 3 rounds, 4 s a point
    .venv/bin/python bench/workers.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.served import run_loadtest  # noqa: E402
from bench.serverproc import ServerProcess, cpu_seconds  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402

SERVERS = {
    "1": ["--workers", "1", "--executor", "worker"],
    "2-worker": ["--workers", "2", "--executor", "worker"],
    "2-device": ["--workers", "2", "--executor", "device"],
    "auto": ["--workers", "auto", "--executor", "auto"],
}
# (tool, target, concurrency, images per request)
LOADS = [
    ("loadtest", "grpc", 1, 1),
    ("loadtest", "grpc", 64, 1),
    ("loadtest", "http", 64, 1),
    ("perf_analyzer", "grpc-v2", 1, 1),
    ("perf_analyzer", "grpc-v2", 64, 1),
]
#: --gpu: the issue's GPU points (single-image Classify and v2 at c=256, 64-image requests, c=1).
GPU_LOADS = [
    ("loadtest", "grpc", 1, 1),
    ("loadtest", "grpc", 256, 1),
    ("perf_analyzer", "grpc-v2", 256, 1),
    ("loadtest", "grpc", 32, 64),
]
PA = Path(os.environ.get("PA_ROOT", "/tmp/perf_analyzer")) / "bin" / "perf_analyzer"


def perf_analyzer(server: ServerProcess, concurrency: int, seconds: float) -> dict:
    """Three measurement windows (perf_analyzer's stability check needs three; its gate is off)."""
    window_ms = max(300, int(seconds * 1000 / 3))
    cmd = [
        str(PA),
        "-m",
        "cifar10",
        "-u",
        server.grpc_target,
        "-i",
        "grpc",
        "-b",
        "1",
        # perf_analyzer's default input (random FP32 bits, NaN included), as a Triton user runs it
        "--shape",
        "input:3,32,32",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        str(window_ms),
        "--stability-percentage",
        "999",
        "--max-trials",
        "3",
    ]
    out = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=seconds * 4 + 120
    ).stdout
    rate = re.search(r"Throughput: ([0-9.]+) infer/sec", out)
    p50 = re.search(r"p50 latency: ([0-9]+) usec", out)
    if not rate or not p50:
        raise RuntimeError(f"perf_analyzer said:\n{out}")
    requests = float(rate.group(1)) * 3 * window_ms / 1000
    return {"img_per_s": float(rate.group(1)), "p50_ms": int(p50.group(1)) / 1000, "requests": requests}


def point(server: ServerProcess, tool: str, protocol: str, concurrency: int, images: int, seconds: float) -> dict:
    pids = server.roles()
    before = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    if tool == "perf_analyzer":
        result = perf_analyzer(server, concurrency, seconds)
    else:
        report = run_loadtest(
            server,
            protocol,
            concurrency,
            seconds,
            0.5,
            processes=4 if concurrency > 64 else 2,
            extra=["--images-per-request", str(images)],
        )
        s = report["summary"]
        result = {
            "img_per_s": s["img_per_s"],
            "p50_ms": s["latency_ms"]["p50"],
            "requests": s["ok"],
            "errors": s["errors"],
        }
    after = {role: sum(cpu_seconds(p) for p in ps) for role, ps in pids.items()}
    # perf_analyzer's count is for its measurement window only; loadtest's ok excludes its warm-up,
    # while CPU counts the warm-up too: a slight over-estimate of CPU per request for loadtest points.
    result["cpu_ms_per_request"] = {
        role: 1000 * (after[role] - before[role]) / max(result["requests"], 1) for role in pids
    }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"subset of {','.join(SERVERS)}")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s points")
    ap.add_argument("--provider", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--gpu", action="store_true", help="the GPU points (c=256, 64-image requests) instead")
    ap.add_argument("--json", default="bench/results/workers.json")
    args = ap.parse_args()
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    names = args.servers.split(",")
    wanted = GPU_LOADS if args.gpu else LOADS
    loads = [load for load in wanted if load[0] != "perf_analyzer" or PA.exists()]
    if len(loads) < len(wanted):
        print(f"perf_analyzer not found at {PA}: its points are skipped", file=sys.stderr)
    extra = ["--providers", args.provider, "--drain-seconds", "0"]
    servers = {name: ServerProcess(*SERVERS[name], *extra) for name in names}
    rows = []
    try:
        for r in range(rounds):
            order = loads[r % len(loads) :] + loads[: r % len(loads)]
            for tool, protocol, concurrency, images in order:
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    row = point(servers[name], tool, protocol, concurrency, images, seconds)
                    row.update(
                        round=r, server=name, tool=tool, protocol=protocol, concurrency=concurrency, images=images
                    )
                    rows.append(row)
                    cpu = ", ".join(f"{k} {v:.3f}" for k, v in row["cpu_ms_per_request"].items())
                    where = f"r{r} {tool:13s} {protocol:7s} c={concurrency:<3d} k={images:<2d} {name:8s}"
                    print(
                        f"{where} {row['img_per_s']:8.0f} img/s p50 {row['p50_ms']:6.2f} ms  CPU ms/request: {cpu}",
                        flush=True,
                    )
    finally:
        for s in servers.values():
            s.stop()
    print("\nmedian over rounds (min), ratio to --workers 1 in the same round (median, min):")
    summary = []
    for tool, protocol, concurrency, images in loads:
        for name in names:
            key = (tool, protocol, concurrency, images)
            mine = [
                x
                for x in rows
                if (x["tool"], x["protocol"], x["concurrency"], x["images"]) == key and x["server"] == name
            ]
            ratios = sorted(
                x["img_per_s"] / base["img_per_s"]
                for x in mine
                for base in rows
                if (base["tool"], base["protocol"], base["concurrency"], base["images"]) == key
                and (base["server"], base["round"]) == ("1", x["round"])
            )
            rates = sorted(x["img_per_s"] for x in mine)
            p50s = sorted(x["p50_ms"] for x in mine)
            entry = {
                "tool": tool,
                "protocol": protocol,
                "concurrency": concurrency,
                "images": images,
                "server": name,
                "img_per_s_median": rates[len(rates) // 2],
                "img_per_s_min": rates[0],
                "p50_ms_median": p50s[len(p50s) // 2],
                "ratio_median": ratios[len(ratios) // 2] if ratios else None,
                "ratio_min": ratios[0] if ratios else None,
            }
            summary.append(entry)
            ratio = "" if not ratios else f"  x{entry['ratio_median']:.2f} (min x{entry['ratio_min']:.2f})"
            where = f"{tool:13s} {protocol:7s} c={concurrency:<3d} k={images:<2d} {name:8s}"
            print(
                f"{where} {entry['img_per_s_median']:8.0f} img/s (min {entry['img_per_s_min']:.0f})  "
                f"p50 {entry['p50_ms_median']:.2f} ms{ratio}"
            )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": machine_info(),
        "rounds": rounds,
        "seconds": seconds,
        "servers": SERVERS,
        "summary": summary,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
