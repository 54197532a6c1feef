"""Served throughput and latency against the ceiling, and the four performance targets.

It starts two servers itself (subprocesses, 127.0.0.1, ephemeral ports, CPU provider): one with
dynamic batching as configured by default, one with ``--max-batch-size 1`` (batching off). Then,
for several interleaved rounds, it

1. measures the ceiling in this process with the server's session options: the best images/s of
   a bare ``session.run`` over batch sizes 1..256, and the median time of one 1-image run;
2. runs ``cnnserve loadtest`` (a subprocess, closed loop, one image per request) for every point
   of concurrency (1, 4, 16, 64, 256) x batching (on, off) x protocol (gRPC Classify, HTTP
   /predict with an image/jpeg body), the points' order rotating from round to round.

Each point prints min / median / max over the rounds of images/s, p50 and p99 latency, the
served ÷ ceiling ratio (each round against its own ceiling), the server's mean batch size and the
load generator's CPU use (near 100% of a core means the client, not the server, was the limit).

``--pinned``: the servers run on core 0 (``taskset -c 0``, ``--intra-op-threads 1``), the load
generator on core 1, and the ceiling is measured with 1 intra-op thread on core 0: one core of
serving against one core of bare ONNX Runtime. Without it nothing is pinned and client and server
share every core (the ceiling then uses ORT's default threads).

Targets (PASS/MISS, from the medians):
  1. 64 concurrent single-image gRPC requests reach >= 60% of the ceiling's images/s;
  2. at concurrency 1, gRPC median latency is within 0.5 ms of one bare 1-image session.run;
  3. batching on vs off at concurrency 64 (gRPC): >= 4x images/s;
  4. HTTP /predict (JPEG body) at concurrency 64 reaches >= 50% of the gRPC images/s.

    .venv/bin/python bench/served.py              # full run (about 8 minutes)
    .venv/bin/python bench/served.py --pinned     # server on core 0, load generator on core 1
    .venv/bin/python bench/served.py --quick      # smoke run (under a minute)

Writes bench/results/served[-pinned].json and docs/img/served[-pinned].png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.plots import finish_axes, machine_title, new_figure, save, spread_errorbar  # noqa: E402
from bench.serverproc import MODEL_REPOSITORY, ServerProcess, parse_cpus, pinned_command  # noqa: E402
from loadtest.machine import machine_info, spread  # noqa: E402
from service.inference.repository import variant_filename  # noqa: E402

CONCURRENCY = [1, 4, 16, 64, 256]
QUICK_CONCURRENCY = [1, 16, 64]
PROTOCOLS = {"grpc": "gRPC Classify", "http": "HTTP /predict (JPEG)"}
BATCHING = {"on": [], "off": ["--max-batch-size", "1"]}


def run_loadtest(
    server: ServerProcess,
    protocol: str,
    concurrency: int,
    duration: float,
    warmup: float,
    processes: int = 1,
    cpus: str | None = None,
    extra: list[str] | None = None,
) -> dict:
    """``cnnserve loadtest --json`` in a subprocess (optionally pinned); returns its report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "service.cli",
            "loadtest",
            "--target",
            protocol,
            "--address",
            server.address(protocol),
            "--metrics-address",
            server.http_address,
            "--concurrency",
            str(concurrency),
            "--duration",
            str(duration),
            "--warmup",
            str(warmup),
            "--processes",
            str(min(processes, concurrency)),
            "--timeout",
            "60",
            "--quiet",
            "--json",
            str(out),
            *(extra or []),
        ]
        cmd, preexec = pinned_command(cmd, cpus)
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, preexec_fn=preexec, timeout=warmup + duration + 180
        )
        if not out.exists():
            raise RuntimeError(f"loadtest failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        report = json.loads(out.read_text())
    report["command"] = " ".join(cmd)
    return report


def measure_ceiling(session, cpus: set[int] | None, batch_sizes: list[int], seconds: float) -> dict:
    """Best images/s over ``batch_sizes`` and the 1-image run time, with this thread pinned to
    ``cpus`` meanwhile (Linux: sched_setaffinity(0) applies to the calling thread, and a 1-thread
    session computes in it)."""
    from bench.ceiling import ceiling_once

    before = os.sched_getaffinity(0) if cpus else None
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        result = ceiling_once(session, batch_sizes, seconds)
    finally:
        if before:
            os.sched_setaffinity(0, before)
    return {k: v for k, v in result.items() if k != "points"}


def _median(agg: dict, key: tuple, field: str) -> float | None:
    row = agg.get(key)
    return None if row is None else row[field]["median"]


def check_targets(agg: dict, ceiling: dict) -> list[dict]:
    """The four targets from the medians; None figures (point not measured) give 'n/a'."""
    grpc64 = _median(agg, ("grpc", "on", 64), "img_per_s")
    off64 = _median(agg, ("grpc", "off", 64), "img_per_s")
    http64 = _median(agg, ("http", "on", 64), "img_per_s")
    p50_1 = _median(agg, ("grpc", "on", 1), "p50_ms")
    best, one = ceiling["best_img_per_s"]["median"], ceiling["latency_1_ms"]["median"]

    def target(number, text, value, limit, ok, shown):
        status = "n/a" if value is None else ("PASS" if ok(value) else "MISS")
        return {"target": number, "text": text, "value": value, "limit": limit, "status": status, "shown": shown}

    ratio1 = None if grpc64 is None else grpc64 / best
    ratio3 = None if grpc64 is None or not off64 else grpc64 / off64
    ratio4 = None if grpc64 is None or http64 is None else http64 / grpc64
    gap2 = None if p50_1 is None else p50_1 - one
    return [
        target(
            1,
            "64 concurrent single-image gRPC >= 60% of ceiling images/s",
            ratio1,
            0.60,
            lambda v: v >= 0.60,
            None if ratio1 is None else f"{grpc64:.0f} / {best:.0f} img/s = {100 * ratio1:.0f}%",
        ),
        target(
            2,
            "concurrency-1 gRPC median latency within 0.5 ms of one 1-image session.run",
            gap2,
            0.5,
            lambda v: v <= 0.5,
            None if gap2 is None else f"p50 {p50_1:.3f} ms - run {one:.3f} ms = {gap2:+.3f} ms",
        ),
        target(
            3,
            "batching on vs off at concurrency 64 (gRPC) >= 4x images/s",
            ratio3,
            4.0,
            lambda v: v >= 4.0,
            None if ratio3 is None else f"{grpc64:.0f} / {off64:.0f} img/s = {ratio3:.2f}x",
        ),
        target(
            4,
            "HTTP /predict JPEG at concurrency 64 >= 50% of gRPC images/s",
            ratio4,
            0.5,
            lambda v: v >= 0.5,
            None if ratio4 is None else f"{http64:.0f} / {grpc64:.0f} img/s = {100 * ratio4:.0f}%",
        ),
    ]


def plot(result: dict, path: Path) -> None:
    fig, (ax1, ax2) = new_figure((12, 4.5))
    conc = result["config"]["concurrency"]
    styles = {("grpc", "on"): "C0-o", ("grpc", "off"): "C0--s", ("http", "on"): "C1-o", ("http", "off"): "C1--s"}
    for row_key, style in styles.items():
        rows = sorted(
            (r for r in result["points"] if (r["protocol"], r["batching"]) == row_key), key=lambda r: r["concurrency"]
        )
        if not rows:
            continue
        xs = [r["concurrency"] for r in rows]
        label = f"{PROTOCOLS[row_key[0]]}, batching {row_key[1]}"
        for ax, field in ((ax1, "img_per_s"), (ax2, "p50_ms")):
            spread_errorbar(ax, xs, [r[field] for r in rows], style, label)
    c = result["ceiling"]
    best = c["best_img_per_s"]["median"]
    ax1.axhline(best, color="k", lw=1, ls=":", label=f"ceiling: bare session.run, best batch ({best:.0f} img/s)")
    ax1.axhline(0.6 * best, color="grey", lw=0.8, ls="-.", label="60% of ceiling")
    one = c["latency_1_ms"]["median"]
    ax2.axhline(one, color="k", lw=1, ls=":", label=f"1-image session.run ({one:.2f} ms)")
    ax1.set(
        xscale="log",
        xlabel="concurrent callers (1 image each)",
        ylabel="images/s (median, min-max bars)",
        title="served throughput",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent callers (1 image each)",
        ylabel="p50 latency, ms",
        title="served latency (client side)",
    )
    finish_axes((ax1, ax2), conc, legend_fontsize=7)
    m = result["machine"]
    mode = "pinned: server core 0, client core 1" if result["config"]["pinned"] else "unpinned"
    rounds = result["config"]["rounds"]
    mode += f", {result['config'].get('precision', 'fp32')}"
    save(fig, path, machine_title(m, mode, f"onnxruntime {m['onnxruntime']}", f"{rounds} rounds"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="execution provider of the servers and the ceiling (default cpu; cuda: --require-gpu)",
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "int8", "fp16"],
        default="fp32",
        help="model variant the servers load and the ceiling times (default fp32; other: *-<precision>.json)",
    )
    ap.add_argument("--pinned", action="store_true", help="server on --server-cpus, load generator on --client-cpus")
    ap.add_argument("--server-cpus", default="0", help="taskset list for the servers with --pinned (default 0)")
    ap.add_argument("--client-cpus", default="1", help="taskset list for the load generator with --pinned (default 1)")
    ap.add_argument("--concurrency", default=None, help="comma-separated (default 1,4,16,64,256)")
    ap.add_argument("--protocols", default="grpc,http", help="grpc,http (default both)")
    ap.add_argument("--batching", default="on,off", help="on,off (default both)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per point (default 5)")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point (default 1)")
    ap.add_argument(
        "--client-processes", type=int, default=1, help="loadtest --processes, at most the concurrency (default 1)"
    )
    ap.add_argument("--ceiling-seconds", type=float, default=0.5, help="seconds per batch size (default 0.5)")
    ap.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for both servers (repeatable), e.g. --server-arg=--max-queue-delay-ms=1",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 2 rounds, concurrency 1,16,64, 1 s points, short ceiling"
    )
    ap.add_argument("--json", default=None, help="default bench/results/served[-pinned].json")
    ap.add_argument("--plot", default=None, help="default docs/img/served[-pinned].png")
    args = ap.parse_args(argv)

    suffix = (
        ("-pinned" if args.pinned else "")
        + ("-cuda" if args.provider == "cuda" else "")
        + ("" if args.precision == "fp32" else f"-{args.precision}")
    )
    json_path = Path(args.json or ROOT / "bench" / "results" / f"served{suffix}.json")
    plot_path = Path(args.plot or ROOT / "docs" / "img" / f"served{suffix}.png")
    if args.quick:
        rounds, duration, warmup, ceiling_s = 2, 1.0, 0.3, 0.1
        concurrency = QUICK_CONCURRENCY
    else:
        rounds, duration, warmup, ceiling_s = args.rounds, args.duration, args.warmup, args.ceiling_seconds
        concurrency = CONCURRENCY
    if args.concurrency:
        concurrency = [int(c) for c in args.concurrency.split(",")]
    protocols = [p for p in args.protocols.split(",") if p]
    batching = [b for b in args.batching.split(",") if b]
    model_file = MODEL_REPOSITORY / "cifar10" / "1" / variant_filename(args.precision)
    if not model_file.is_file():
        print(f"served: no {model_file} (run cnnserve export / quantize first)", file=sys.stderr)
        return 1

    server_cpus = client_cpus = None
    threads = 0
    if args.pinned:
        available = os.sched_getaffinity(0)
        server_cpus, client_cpus = args.server_cpus, args.client_cpus
        missing = (parse_cpus(server_cpus) | parse_cpus(client_cpus)) - available
        if missing:
            print(
                f"served: --pinned needs CPUs {sorted(missing)}, this process may use {sorted(available)}",
                file=sys.stderr,
            )
            return 1
        threads = 1

    from bench.ceiling import BATCH_SIZES, QUICK_BATCH_SIZES, make_session

    machine = machine_info()
    session = make_session(model_file, threads, provider=args.provider)
    server_extra = ["--precision", args.precision]
    server_extra += ["--intra-op-threads", str(threads)] if args.pinned else []
    if args.provider == "cuda":
        server_extra += ["--providers", "cuda", "--require-gpu"]
    servers: dict[str, ServerProcess] = {}
    try:
        for b in batching:
            servers[b] = ServerProcess(
                "--drain-seconds", "0", *server_extra, *BATCHING[b], *args.server_arg, cpus=server_cpus, wait=""
            )
        for s in servers.values():
            s.wait_ready()
        points = [(p, b, c) for p in protocols for b in batching for c in concurrency]
        print(
            f"served: {'pinned' if args.pinned else 'unpinned'}, {rounds} rounds x {len(points)} points x "
            f"({warmup:g} + {duration:g}) s; {machine['cpu_model']}, {machine['cpu_count']} cores, "
            f"load {machine['load_average']}",
            file=sys.stderr,
        )
        ceilings, runs = [], []
        for r in range(rounds):
            ceil = measure_ceiling(
                session, parse_cpus(server_cpus), QUICK_BATCH_SIZES if args.quick else BATCH_SIZES, ceiling_s
            )
            ceil["round"] = r
            ceilings.append(ceil)
            print(
                f"round {r + 1}/{rounds}: ceiling {ceil['best_img_per_s']:.0f} img/s (batch "
                f"{ceil['best_batch_size']}), 1-image run {ceil['latency_1_ms']:.3f} ms",
                file=sys.stderr,
            )
            shift = (r * len(points)) // max(rounds, 1)
            for p, b, c in points[shift:] + points[:shift]:
                report = run_loadtest(servers[b], p, c, duration, warmup, args.client_processes, client_cpus)
                s, lat, srv = report["summary"], report["summary"]["latency_ms"], report["server"] or {}
                run = {
                    "round": r,
                    "protocol": p,
                    "batching": b,
                    "concurrency": c,
                    "img_per_s": s["img_per_s"],
                    "p50_ms": lat["p50"],
                    "p99_ms": lat["p99"],
                    "ok": s["ok"],
                    "errors": s["errors"],
                    "errors_by_code": report["errors_by_code"],
                    "ratio_to_ceiling": s["img_per_s"] / ceil["best_img_per_s"],
                    "server_batch_size_mean": srv.get("batch_size_mean"),
                    "server_queue_ms_mean": srv.get("queue_ms_mean"),
                    "client_cpu_percent": report["client"]["cpu_percent"],
                    "command": report["command"],
                }
                runs.append(run)
                print(
                    f"  {p:4s} batching {b:3s} c={c:<4d} {s['img_per_s']:8.0f} img/s  p50 {lat['p50'] or 0:7.2f} ms"
                    f"  p99 {lat['p99'] or 0:7.2f} ms  batch {srv.get('batch_size_mean') or 0:6.2f}  "
                    f"client CPU {report['client']['cpu_percent']:4.0f}%"
                    + (f"  ERRORS {report['errors_by_code']}" if s["errors"] else ""),
                    file=sys.stderr,
                )
    finally:
        for s in servers.values():
            s.stop()

    agg: dict[tuple, dict] = {}
    out_points = []
    for p, b, c in points:
        mine = [x for x in runs if (x["protocol"], x["batching"], x["concurrency"]) == (p, b, c)]
        row = {
            "protocol": p,
            "batching": b,
            "concurrency": c,
            **{
                f: spread([x[f] for x in mine])
                for f in (
                    "img_per_s",
                    "p50_ms",
                    "p99_ms",
                    "ratio_to_ceiling",
                    "server_batch_size_mean",
                    "client_cpu_percent",
                )
            },
            "errors": sum(x["errors"] for x in mine),
        }
        agg[(p, b, c)] = row
        out_points.append(row)
    ceiling = {
        "best_img_per_s": spread([c["best_img_per_s"] for c in ceilings]),
        "latency_1_ms": spread([c["latency_1_ms"] for c in ceilings]),
        "best_batch_sizes": [c["best_batch_size"] for c in ceilings],
        "intra_op_threads": "1" if threads == 1 else "default",
        "cpus": server_cpus,
    }
    targets = check_targets(agg, ceiling)

    def mmm(d: dict, fmt: str) -> str:
        return " / ".join(format(d[k], fmt) if d[k] is not None else "-" for k in ("min", "median", "max"))

    print(
        f"\nceiling (intra-op threads: {ceiling['intra_op_threads']}{', cpus ' + server_cpus if server_cpus else ''}):"
        f" best {mmm(ceiling['best_img_per_s'], '.0f')} img/s, 1-image run {mmm(ceiling['latency_1_ms'], '.3f')} ms"
        f"  (min / median / max over {rounds} rounds)"
    )
    print(
        f"{'protocol':8} {'batch':5} {'conc':>4}  {'images/s min / median / max':>28}  {'p50 ms':>23}  "
        f"{'p99 ms':>23}  {'÷ ceiling':>9}  {'batch':>5}  {'client CPU':>10}  errors"
    )
    for row in out_points:
        print(
            f"{row['protocol']:8} {row['batching']:5} {row['concurrency']:>4}  {mmm(row['img_per_s'], '8.0f'):>28}  "
            f"{mmm(row['p50_ms'], '6.2f'):>23}  {mmm(row['p99_ms'], '6.2f'):>23}  "
            f"{row['ratio_to_ceiling']['median']:9.2f}  {row['server_batch_size_mean']['median'] or 0:5.1f}  "
            f"{row['client_cpu_percent']['median']:9.0f}%  {row['errors']}"
        )
    print("\ntargets:")
    for t in targets:
        print(f"  {t['status']:4s} ({t['target']}) {t['text']}: {t['shown'] or 'not measured in this run'}")
    if any(row["client_cpu_percent"]["median"] >= 85 * args.client_processes for row in out_points):
        print("note: the load generator was near 100% CPU on some points: those measure the client, not the server")

    result = {
        "benchmark": "served",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "config": {
            "provider": args.provider,
            "precision": args.precision,
            "pinned": args.pinned,
            "server_cpus": server_cpus,
            "client_cpus": client_cpus,
            "concurrency": concurrency,
            "protocols": protocols,
            "batching": batching,
            "rounds": rounds,
            "duration_s": duration,
            "warmup_s": warmup,
            "client_processes": args.client_processes,
            "ceiling_seconds_per_batch_size": ceiling_s,
            "quick": args.quick,
            "server_commands": {b: " ".join(s.command) for b, s in servers.items()},
        },
        "ceiling": ceiling,
        "ceiling_rounds": ceilings,
        "targets": targets,
        "points": out_points,
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, plot_path)
    print(f"\nwrote {json_path} and {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
