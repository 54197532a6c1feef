"""The ceiling: what ONNX Runtime alone does on this machine, with no server in the way.

For batch sizes 1, 2, 4, ..., 256 and intra-op threads "default" (ORT: one per core) and 1, it
times ``session.run`` on a ready float32 input in this process — no decoding, no normalisation,
no softmax, no batching queue — and reports images/s and the median time of one run. The session
options are the server's own (``service.inference.runtime.session_options``: sequential execution, all
graph optimisations, idle threads not spinning unless ``--allow-spinning``), so the figures are
what the server's runtime could do at best.

Rounds are interleaved (every point once per round, order reversed every other round), so a
slow patch of the machine spreads over all points instead of spoiling one; each point prints
min / median / max over the rounds.

    .venv/bin/python bench/ceiling.py            # full run (about 2 minutes)
    .venv/bin/python bench/ceiling.py --quick    # smoke run (seconds)

Writes bench/results/ceiling.json (machine, settings, every round) and docs/img/ceiling.png.

``--precision fp32,int8`` (or fp16) times each precision variant of the model (``model.onnx``,
``model.int8.onnx``, ``model.fp16.onnx`` beside ``--model``) in the same interleaved rounds and
prints each variant's speed-up over fp32 per thread setting and batch size; it writes
bench/results/ceiling-precision.json and docs/img/ceiling-precision.png unless told otherwise.
The comparison in docs/benchmarks.md:

    .venv/bin/python bench/ceiling.py --precision fp32,int8 --threads 1,2 --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.plots import finish_axes, machine_title, new_figure, save, spread_errorbar  # noqa: E402
from loadtest.machine import machine_info, spread  # noqa: E402
from service.inference.repository import variant_filename  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "cifar10" / "1" / "model.onnx"
BATCH_SIZES = [2**i for i in range(9)]  # 1 .. 256
QUICK_BATCH_SIZES = [1, 4, 16, 64, 256]


def make_session(model: str | Path, threads: int, allow_spinning: bool = False, provider: str = "cpu"):
    """An InferenceSession with the server's session options and provider options: on the CPU with
    ``threads`` intra-op threads (0: ORT's default), or on CUDA (``provider="cuda"``; it refuses
    to fall back to the CPU, so a CUDA figure is never a CPU one)."""
    import onnxruntime as ort

    from service.inference.runtime import CUDA, provider_options, session_options
    from service.settings import Settings

    settings = Settings(providers=[provider], intra_op_threads=threads, ort_allow_spinning=allow_spinning)
    providers = provider_options(settings)
    session = ort.InferenceSession(
        str(model),
        sess_options=session_options(settings),
        providers=[p for p, _ in providers],
        provider_options=[o for _, o in providers],
    )
    if provider == "cuda" and session.get_providers()[0] != CUDA:
        raise SystemExit(f"ceiling: CUDA was asked for but the session runs on {session.get_providers()[0]}")
    return session


def input_batch(session, batch_size: int, seed: int = 0) -> np.ndarray:
    shape = [batch_size] + [d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape[1:]]
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def time_runs(session, x: np.ndarray, seconds: float, min_runs: int = 5, warm: int = 3) -> dict:
    """Run ``session`` on ``x`` back to back for about ``seconds``; images/s and per-run times."""
    name = session.get_inputs()[0].name
    out = [session.get_outputs()[0].name]
    run = session.run
    feed = {name: x}
    for _ in range(warm):
        run(out, feed)
    times = []
    perf = time.perf_counter
    started = perf()
    while True:
        t = perf()
        run(out, feed)
        done = perf()
        times.append(done - t)
        if done - started >= seconds and len(times) >= min_runs:
            break
    total = perf() - started
    arr = np.asarray(times) * 1000.0
    return {
        "img_per_s": len(x) * len(times) / total,
        "latency_ms_median": float(np.median(arr)),
        "latency_ms_p99": float(np.percentile(arr, 99)),
        "runs": len(times),
    }


def ceiling_once(session, batch_sizes: list[int], seconds: float) -> dict:
    """One pass over the batch sizes: best images/s (and at which size) and 1-image latency."""
    points = {bs: time_runs(session, input_batch(session, bs), seconds) for bs in batch_sizes}
    best = max(points, key=lambda bs: points[bs]["img_per_s"])
    one = points.get(1) or time_runs(session, input_batch(session, 1), seconds)
    return {
        "best_img_per_s": points[best]["img_per_s"],
        "best_batch_size": best,
        "latency_1_ms": one["latency_ms_median"],
        "points": points,
    }


def plot(result: dict, path: Path) -> None:
    fig, (ax1, ax2) = new_figure()
    for label, rows in result["summary"].items():
        bs = [r["batch_size"] for r in rows]
        spread_errorbar(ax1, bs, [r["img_per_s"] for r in rows], label=label)
        spread_errorbar(ax2, bs, [r["latency_ms"] for r in rows], label=label)
    ax1.set(
        xscale="log",
        xlabel="batch size",
        ylabel="images/s (median, min-max bars)",
        title="ONNX Runtime alone: throughput",
    )
    ax2.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="ms per session.run (median of runs)",
        title="ONNX Runtime alone: time per batch",
    )
    finish_axes((ax1, ax2), result["config"]["batch_sizes"])
    m = result["machine"]
    save(fig, path, machine_title(m, f"onnxruntime {m['onnxruntime']}", f"{result['config']['rounds']} rounds"))


def thread_label(threads: int, precision: str | None = None) -> str:
    label = "intra-op threads: default" if threads == 0 else f"intra-op threads: {threads}"
    return label if precision is None else f"{precision}, {label}"


def speedups(summary: dict, precisions: list[str], threads: list[int]) -> list[dict]:
    """Each variant's median ms per run against fp32's, per thread setting and batch size."""
    out = []
    for t in threads:
        base = {r["batch_size"]: r["latency_ms"]["median"] for r in summary[thread_label(t, "fp32")]}
        for p in precisions:
            if p == "fp32":
                continue
            for r in summary[thread_label(t, p)]:
                bs = r["batch_size"]
                out.append(
                    {
                        "precision": p,
                        "threads": t,
                        "batch_size": bs,
                        "fp32_ms": base[bs],
                        "ms": r["latency_ms"]["median"],
                        "speedup": base[bs] / r["latency_ms"]["median"],
                    }
                )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 1,2,4,...,256)")
    ap.add_argument("--threads", default="0,1", help="intra-op thread settings, 0 = ORT default (default 0,1)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per point per round (default 1)")
    ap.add_argument("--allow-spinning", action="store_true", help="let ORT's idle threads spin (server: off)")
    ap.add_argument(
        "--provider",
        choices=["cpu", "cuda"],
        default="cpu",
        help="execution provider (default cpu; cuda: --threads only sizes the CPU-side pool)",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        help="comma-separated variants of --model to time: fp32, int8, fp16 (default fp32)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 0.15 s per point, 5 batch sizes")
    ap.add_argument("--json", default=None, help="default bench/results/ceiling[-cuda].json")
    ap.add_argument("--plot", default=None, help="default docs/img/ceiling[-cuda].png")
    args = ap.parse_args(argv)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    compare = precisions != ["fp32"]
    suffix = ("-precision" if compare else "") + ("-cuda" if args.provider == "cuda" else "")
    args.json = args.json or str(ROOT / "bench" / "results" / f"ceiling{suffix}.json")
    args.plot = args.plot or str(ROOT / "docs" / "img" / f"ceiling{suffix}.png")

    if args.quick:
        rounds, seconds, sizes = 2, 0.15, QUICK_BATCH_SIZES
    else:
        rounds, seconds, sizes = args.rounds, args.seconds, BATCH_SIZES
    if args.batch_sizes:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    models = {p: Path(args.model).with_name(variant_filename(p)) if compare else Path(args.model) for p in precisions}
    missing = [str(m) for m in models.values() if not m.is_file()]
    if missing:
        print(f"ceiling: no model at {', '.join(missing)} (run cnnserve export / quantize first)", file=sys.stderr)
        return 1

    machine = machine_info()
    sessions = {
        (p, t): make_session(models[p], t, args.allow_spinning, args.provider) for p in precisions for t in threads
    }
    inputs = {bs: input_batch(sessions[precisions[0], threads[0]], bs) for bs in sizes}
    points = [(p, t, bs) for p in precisions for t in threads for bs in sizes]
    print(
        f"ceiling: {', '.join(map(str, models.values()))}, {rounds} rounds x {len(points)} points x {seconds:g} s; "
        f"{machine['cpu_model']}, {machine['cpu_count']} cores, load {machine['load_average']}",
        file=sys.stderr,
    )
    rounds_out = []
    for r in range(rounds):
        order = points if r % 2 == 0 else points[::-1]
        this = []
        for p, t, bs in order:
            m = time_runs(sessions[p, t], inputs[bs], seconds)
            this.append({"precision": p, "threads": t, "batch_size": bs, **m})
        rounds_out.append(this)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

    summary: dict[str, list] = {}
    print(
        f"\n{'variant':>7} {'threads':>9} {'batch':>6} {'images/s min / median / max':>34} "
        f"{'ms per run min / median / max':>34}"
    )
    for prec, t in ((p, t) for p in precisions for t in threads):
        rows = []
        for bs in sizes:
            mine = [
                q for rnd in rounds_out for q in rnd if (q["precision"], q["threads"], q["batch_size"]) == (prec, t, bs)
            ]
            ips = [q["img_per_s"] for q in mine]
            lat = [q["latency_ms_median"] for q in mine]
            row = {"batch_size": bs, "img_per_s": spread(ips), "latency_ms": spread(lat)}
            rows.append(row)
            a, b = row["img_per_s"], row["latency_ms"]
            print(
                f"{prec:>7} {'default' if t == 0 else t:>9} {bs:>6}"
                f" {a['min']:10.0f} / {a['median']:8.0f} / {a['max']:8.0f}"
                f" {b['min']:12.3f} / {b['median']:8.3f} / {b['max']:8.3f}"
            )
        summary[thread_label(t, prec if compare else None)] = rows
        best = max(rows, key=lambda row: row["img_per_s"]["median"])
        one = next((row["latency_ms"]["median"] for row in rows if row["batch_size"] == 1), float("nan"))
        rate = best["img_per_s"]["median"]
        print(f"{'':>17} best: {rate:.0f} images/s at batch {best['batch_size']}; 1 image: {one:.3f} ms")

    ratios = speedups(summary, precisions, threads) if compare and "fp32" in precisions else []
    if ratios:
        print(f"\n{'variant':>7} {'threads':>9} {'batch':>6} {'fp32 ms':>9} {'ms':>9} {'speed-up':>9}")
        for r in ratios:
            t = "default" if r["threads"] == 0 else r["threads"]
            print(
                f"{r['precision']:>7} {t:>9} {r['batch_size']:>6}"
                f" {r['fp32_ms']:9.3f} {r['ms']:9.3f} {r['speedup']:8.2f}x"
            )

    result = {
        "benchmark": "ceiling",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "config": {
            "model": str(args.model),
            "precisions": precisions,
            "models": {p: str(m) for p, m in models.items()},
            "provider": args.provider,
            "batch_sizes": sizes,
            "threads": threads,
            "rounds": rounds,
            "seconds_per_point": seconds,
            "allow_spinning": args.allow_spinning,
            "quick": args.quick,
        },
        "summary": summary,
        "speedups": ratios,
        "rounds": rounds_out,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.plot))
    print(f"\nwrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
