"""Where a request's CPU goes: py-spy profiles of one server process under ``cnnserve loadtest``
(default: 64 callers, one image a request) for each protocol, as flame graphs (SVG) and a table
of the share of the server's samples spent in each stage of the request path.

    .venv/bin/pip install py-spy   # in the dev extra
    .venv/bin/python bench/profile_path.py --out docs/img --seconds 8

The server runs with ``--workers 1 --executor worker`` (one process: the model's thread is part
of it, shown as its own stage) so one py-spy covers the whole path; idle threads are not sampled.
Each sample goes to the innermost frame a stage claims (STAGES, first rule first); the shares
times the process's core-µs per request (/proc, over the requests it answered) give core-µs per
stage. The flame graph comes from a second window of the same load. Writes
``<out>/profile-<target>.svg``, ``bench/results/profile-path.json``, and leaves py-spy's raw
samples in ``$TMPDIR/profile-<target>.raw.txt`` for line-level digging.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402

# (stage, substrings of a frame "function (file)"): the first stage any frame of a sample matches,
# innermost frame first.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    (
        "model thread (ONNX Runtime, softmax, ranking)",
        ("onnxruntime/", "service/inference/runtime.py", "postprocess.py"),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("image decode / preprocess", ("service/inference/decoding.py", "service/inference/preprocess.py", "PIL/")),
    ("answer encoding (protobuf/JSON)", ("SerializeToString", "encode_response", "orjson", "json/encoder")),
    ("batcher + core", ("service/inference/batcher.py", "service/inference/core.py")),
    ("OIP codec (service/protocol)", ("service/protocol/",)),
    ("gRPC guard / instrumentation", ("service/grpc_api/instrumented.py", "service/grpc_api/reset_budget.py")),
    ("gRPC handlers", ("service/grpc_api/",)),
    ("grpc.aio machinery", ("grpc/_cython", "grpc/aio/")),
    ("FastAPI / Starlette routing + validation", ("fastapi/", "starlette/", "pydantic")),
    ("HTTP handlers + middleware", ("service/http_api/",)),
    ("uvicorn / httptools", ("uvicorn/", "httptools")),
    # Frames py-spy cannot see under the loop's own: uvloop, grpc's C core, httptools' parser.
    ("event loop + native I/O (uvloop, grpc core)", ("asyncio/", "uvloop")),
    ("other threads (native: grpc poller, pools)", ("threading.py",)),
]


def stage_of(stack: str) -> str:
    frames = stack.split(";")[::-1]
    for frame in frames:
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="http,grpc,grpc-v2")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the SVG flame graphs")
    ap.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL (Python CPU; a thread waiting for the GIL is not counted)",
    )
    ap.add_argument("--server-args", default="--workers 1 --executor worker")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "profile-path.json"))
    args = ap.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(), "concurrency": args.concurrency, "targets": {}}
    server = ServerProcess(*args.server_args.split())
    try:
        for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
            load = subprocess.Popen(
                [
                    *(sys.executable, "-m", "loadtest", "--target", target),
                    *("--address", server.address(target), "--concurrency", str(args.concurrency)),
                    *("--duration", str(2 * args.seconds + 4), "--warmup", "1", "--metrics-address", "none", "--quiet"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
            subprocess.run(["sleep", "1.5"], check=True)
            served, cpu = server.requests_served(), server.cpu_by_role()
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "raw.txt"
                record = [py_spy, "record", "--pid", str(server.proc.pid), "--duration", str(int(args.seconds))]
                record += ["--rate", "250", "--nonblocking"] + (["--gil"] if args.gil else [])
                subprocess.run([*record, "--format", "raw", "--output", str(raw)], check=True, capture_output=True)
                cpu_ms = 1000 * sum(server.cpu_by_role().values()) - 1000 * sum(cpu.values())
                requests = server.requests_served() - served
                # Then the flame graph, from a second window of the same load (py-spy writes one format
                # a recording).
                svg = out / f"profile-{target}.svg"
                subprocess.run(
                    [*record, "--format", "flamegraph", "--output", str(svg)], check=True, capture_output=True
                )
                shutil.copy(raw, Path(tempfile.gettempdir()) / f"profile-{target}.raw.txt")
                stages: Counter[str] = Counter()
                for line in raw.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    stages[stage_of(stack)] += int(count)
            load.wait()
            total = sum(stages.values()) or 1
            per_request_us = 1000 * cpu_ms / max(requests, 1)
            report["targets"][target] = {
                "requests": requests,
                "core_us_per_request": per_request_us,
                "stages": {
                    s: {"share": n / total, "core_us": per_request_us * n / total} for s, n in stages.most_common()
                },
            }
            print(f"{target}: {requests:.0f} requests, {per_request_us:.0f} core-µs/request (whole process)")
            for s, n in stages.most_common():
                print(f"  {s:<44} {100 * n / total:5.1f} %  {per_request_us * n / total:6.0f} µs")
    finally:
        server.stop()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
