"""Served throughput with the default precision (auto) against ``--precision fp32``, same run.

Issue 16's bar: with the defaults, served throughput under batch-forming load is at least 0.95x
of FP32's on any CPU. Two servers start here (defaults otherwise: ``--workers auto``, CPU
provider), one after the other so that auto's timing at load runs on a quiet machine; then, for
``--rounds`` interleaved rounds (the order alternates), ``cnnserve loadtest`` drives each with
``--concurrency`` closed-loop callers sending ``--images-per-request`` images per request (gRPC
Classify, then HTTP /predict). Prints images/s per round, the medians and auto ÷ fp32, and what
auto chose (its check and timing, from /readyz).

    .venv/bin/python bench/precision_served.py               # 3 rounds x 2 protocols x 2 servers x 8 s
    .venv/bin/python bench/precision_served.py --quick       # 1 round, 3 s points

Writes bench/results/precision-served.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.served import run_loadtest  # noqa: E402
from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402


def readyz(server: ServerProcess) -> dict:
    with urllib.request.urlopen(f"{server.http}/readyz", timeout=5) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--images-per-request", type=int, default=8)
    p.add_argument("--protocols", default="grpc,http")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "precision-served.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 1.0
    protocols = [x for x in args.protocols.split(",") if x]
    machine = machine_info()
    servers = {"auto": ServerProcess("--drain-seconds", "0")}
    servers["fp32"] = ServerProcess("--drain-seconds", "0", "--precision", "fp32")
    try:
        chosen = {k: readyz(s)["models"][0] for k, s in servers.items()}
        auto = chosen["auto"]
        print(f"auto serves {auto['precision']}: {json.dumps(auto['precision_choice'])}", flush=True)
        runs = []
        for r in range(args.rounds):
            order = ["auto", "fp32"] if r % 2 == 0 else ["fp32", "auto"]
            for protocol in protocols:
                for name in order:
                    extra = ["--images-per-request", str(args.images_per_request)]
                    report = run_loadtest(
                        servers[name], protocol, args.concurrency, args.duration, args.warmup, extra=extra
                    )
                    s = report["summary"]
                    runs.append(
                        {
                            "round": r,
                            "server": name,
                            "protocol": protocol,
                            "img_per_s": s["img_per_s"],
                            "p50_ms": s["latency_ms"]["p50"],
                            "errors": s["errors"],
                            "mean_batch": (report.get("server") or {}).get("batch_size_mean"),
                            "command": report["command"],
                        }
                    )
                    print(
                        f"round {r} {protocol:4s} {name:4s} {s['img_per_s']:8.0f} images/s  p50 "
                        f"{s['latency_ms']['p50']:.1f} ms  errors {s['errors']}",
                        flush=True,
                    )
    finally:
        for s in servers.values():
            s.stop()
    summary = {}
    for protocol in protocols:
        med = {
            n: statistics.median(x["img_per_s"] for x in runs if x["server"] == n and x["protocol"] == protocol)
            for n in servers
        }
        summary[protocol] = {
            "auto_img_per_s": med["auto"],
            "fp32_img_per_s": med["fp32"],
            "ratio": med["auto"] / med["fp32"],
        }
        print(
            f"{protocol}: auto ({auto['precision']}) {med['auto']:.0f} images/s vs fp32 {med['fp32']:.0f}: "
            f"{med['auto'] / med['fp32']:.2f}x (medians of {args.rounds})"
        )
    out = {
        "command": "python bench/precision_served.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "config": vars(args),
        "auto": auto,
        "runs": runs,
        "summary": summary,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
