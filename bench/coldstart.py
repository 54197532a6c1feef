"""Cold start and memory: process start → listening → ready, and resident memory before and after load.

Each round starts a fresh ``cnnserve serve`` (subprocess, 127.0.0.1, ephemeral ports, CPU
provider) and measures, from the moment of the spawn:

- listening: the "listening http=... grpc=..." log line (interpreter start + imports + binding);
- ready: the first 200 from GET /readyz, polled every 5 ms (models loaded and warmed up: one run
  of every power-of-two batch size up to --max-batch-size); also the server's own "ready in Xs"
  log figure, which starts after the imports;
- VmRSS from /proc/PID/status once ready (after warm-up), then after a load burst (gRPC and HTTP
  at concurrency 64 for --burst seconds each, ``loadtest``), and VmHWM (the peak);
- stop: SIGTERM until exit, with --drain-seconds 0.

Prints min / median / max over the rounds.

    .venv/bin/python bench/coldstart.py            # 5 rounds
    .venv/bin/python bench/coldstart.py --quick    # smoke run (2 rounds, short bursts)
    .venv/bin/python bench/coldstart.py --server-arg=--max-batch-size=256   # bigger warm-up

Writes bench/results/coldstart.json and docs/img/coldstart.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.plots import finish_axes, machine_title, new_figure, save  # noqa: E402
from bench.serverproc import MODEL_REPOSITORY, ServerProcess  # noqa: E402
from loadtest.config import LoadConfig  # noqa: E402
from loadtest.machine import machine_info, spread  # noqa: E402
from loadtest.runner import run  # noqa: E402


def burst(server: ServerProcess, seconds: float, concurrency: int) -> dict:
    """gRPC then HTTP load for ``seconds`` each; ok/error counts per protocol."""
    out = {}
    for target in ("grpc", "http"):
        cfg = LoadConfig(
            target=target,
            address=server.address(target),
            concurrency=concurrency,
            duration=seconds,
            warmup=0.0,
            metrics_address="none",
            progress=False,
        )
        report = run(cfg)
        out[target] = {
            "ok": report["summary"]["ok"],
            "errors": report["summary"]["errors"],
            "img_per_s": report["summary"]["img_per_s"],
        }
    return out


def plot(result: dict, path: Path) -> None:
    rounds = result["rounds"]
    xs = list(range(1, len(rounds) + 1))
    fig, (ax1, ax2) = new_figure()
    for key, label, style in (
        ("listening_s", "spawn → listening (log line)", "o-"),
        ("ready_s", "spawn → ready (/readyz 200)", "s-"),
        ("stop_s", "SIGTERM → exit", "^--"),
    ):
        ax1.plot(xs, [r[key] for r in rounds], style, label=label)
    ax1.set(xlabel="round", ylabel="seconds", title="start-up and shutdown", ylim=(0, None))
    for key, label, style in (
        ("rss_ready_mib", "VmRSS when ready", "o-"),
        ("rss_after_burst_mib", "VmRSS after load burst", "s-"),
        ("hwm_mib", "VmHWM (peak)", "x--"),
    ):
        ax2.plot(xs, [r[key] for r in rounds], style, label=label)
    ax2.set(xlabel="round", ylabel="MiB", title="resident memory", ylim=(0, None))
    finish_axes((ax1, ax2), xs, legend_fontsize=8)
    m = result["machine"]
    save(fig, path, machine_title(m, f"python {m['python']}", f"onnxruntime {m['onnxruntime']}"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="fresh server starts (default 5)")
    ap.add_argument("--burst", type=float, default=3.0, help="seconds of load per protocol (default 3)")
    ap.add_argument("--concurrency", type=int, default=64, help="callers during the burst (default 64)")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for the server (repeatable), e.g. --server-arg=--max-batch-size=256",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 0.5 s bursts")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "coldstart.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "img" / "coldstart.png"))
    args = ap.parse_args(argv)
    rounds, burst_s = (2, 0.5) if args.quick else (args.rounds, args.burst)
    if not (MODEL_REPOSITORY / "cifar10" / "1" / "model.onnx").is_file():
        print(f"coldstart: no model in {MODEL_REPOSITORY} (run cnnserve export first)", file=sys.stderr)
        return 1

    machine = machine_info()
    print(
        f"coldstart: {rounds} rounds, {burst_s:g} s bursts at concurrency {args.concurrency}; "
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average']}",
        file=sys.stderr,
    )
    out = []
    command = None
    for r in range(rounds):
        server = ServerProcess("--drain-seconds", "0", *args.server_arg, wait="")
        command = " ".join(server.command)
        try:
            ready_s = server.poll_readyz()
            server.wait_ready()
            listening_s = server.listening_at - server.spawned
            mem_ready = server.memory()
            load = burst(server, burst_s, args.concurrency)
            time.sleep(0.2)
            mem_after = server.memory()
        finally:
            server.stop()
            stop_s = server.stop_seconds
        row = {
            "round": r,
            "listening_s": listening_s,
            "ready_s": ready_s,
            "ready_in_logged_s": server.ready_in_s,
            "rss_ready_mib": mem_ready["VmRSS"],
            "rss_after_burst_mib": mem_after["VmRSS"],
            "hwm_mib": mem_after["VmHWM"],
            "stop_s": stop_s,
            "exit_code": server.proc.returncode,
            "burst": load,
        }
        out.append(row)
        errors = sum(v["errors"] for v in load.values())
        print(
            f"  round {r + 1}: listening {listening_s:.2f} s, ready {ready_s:.2f} s (server log: ready in "
            f"{server.ready_in_s:.2f} s), RSS {mem_ready['VmRSS']:.0f} → {mem_after['VmRSS']:.0f} MiB "
            f"(peak {mem_after['VmHWM']:.0f}), stop {stop_s:.2f} s, exit {server.proc.returncode}"
            + (f", {errors} request errors" if errors else ""),
            file=sys.stderr,
        )

    fields = {
        "listening_s": "listening after spawn, s",
        "ready_s": "ready (/readyz 200) after spawn, s",
        "ready_in_logged_s": "server's own 'ready in', s",
        "rss_ready_mib": "VmRSS when ready, MiB",
        "rss_after_burst_mib": "VmRSS after load burst, MiB",
        "hwm_mib": "VmHWM (peak), MiB",
        "stop_s": "SIGTERM → exit, s",
    }
    summary = {f: spread([row[f] for row in out]) for f in fields}
    print(f"\n{'':36} {'min':>9} {'median':>9} {'max':>9}")
    for f, label in fields.items():
        s = summary[f]
        print(f"{label:36} {s['min']:9.2f} {s['median']:9.2f} {s['max']:9.2f}")

    result = {
        "benchmark": "coldstart",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "server_command": command,
        "machine": machine,
        "config": {
            "rounds": rounds,
            "burst_s": burst_s,
            "concurrency": args.concurrency,
            "server_args": args.server_arg,
            "quick": args.quick,
        },
        "summary": summary,
        "rounds": out,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.plot))
    print(f"\nwrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
