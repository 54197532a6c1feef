"""The report of a run: its JSON document, the text summary, and one CSV row."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from loadtest.config import PERCENTILES, LoadConfig
from loadtest.machine import cores_available, machine_info
from loadtest.metrics import Monitor
from loadtest.probe import Probe

CSV_COLUMNS = [
    "timestamp",
    "target",
    "address",
    "loop",
    "concurrency",
    "rate",
    "images_per_request",
    "processes",
    "warmup_s",
    "window_s",
    "requests",
    "ok",
    "errors",
    "dropped_arrivals",
    "images",
    "req_per_s",
    "img_per_s",
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "server_batch_size_mean",
    "server_queue_ms_mean",
    "server_compute_ms_mean",
    "server_batches",
    "client_cpu_percent",
    "client_cpu_percent_max_process",
    "client_cpu_percent_run",
    "errors_by_code",
]


def build_report(
    cfg: LoadConfig,
    results: list[dict],
    monitor: Monitor,
    probe: Probe,
    info: dict,
    loop_kind: str,
    wall: float,
    cpu_run: float,
    load_before: list[float] | None = None,
) -> dict:
    """The run's JSON document from the client processes' results and the metrics monitor."""
    lat = np.concatenate([r["latencies"] for r in results]) if results else np.empty(0)
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    n_err = sum(errors.values())
    t0 = min(r["t0"] for r in results)
    end = max(r["end"] for r in results)
    window = max(end - t0, 1e-9)
    ok = len(lat)
    ms = lat * 1000.0
    latency = {"mean": float(ms.mean()) if ok else None, "max": float(ms.max()) if ok else None}
    for p in PERCENTILES:
        latency[f"p{p}"] = float(np.percentile(ms, p)) if ok else None
    cpu_percent = [100.0 * r["cpu_s"] / max(r["cpu_window_s"], 1e-9) for r in results]
    k = cfg.images_per_request
    summary = {
        "window_s": window,
        "requests": ok + n_err,
        "ok": ok,
        "errors": n_err,
        "dropped_arrivals": sum(r["dropped"] for r in results),
        "images": ok * k,
        "req_per_s": ok / window,
        "img_per_s": ok * k / window,
        "latency_ms": latency,
    }
    config = asdict(cfg)
    config["address"] = cfg.resolved_address()
    config["metrics_url"] = cfg.resolved_metrics_url()  # what was scraped; metrics_address: what was asked
    config["loop"] = "open" if cfg.open_loop else "closed"
    return {
        "tool": "cnnserve loadtest",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "inputs": info,
        "summary": summary,
        "errors_by_code": dict(sorted(errors.items())),
        "server": monitor.delta(),
        "server_scrape_error": monitor.scrape_error,
        # Why the server figures may not be this run's (another server, model or other clients).
        "server_warnings": monitor.warnings(cfg, probe, ok + n_err),
        "client": {
            "event_loop": loop_kind,
            "processes": cfg.processes,
            # CPU of the client processes over the measured window; 100 = one core busy.
            "cpu_percent": sum(cpu_percent),
            "cpu_percent_per_process": cpu_percent,
            # getrusage(self + children) over the whole command, set-up included.
            "cpu_percent_run": 100.0 * cpu_run / max(wall, 1e-9),
            "cores_available": cores_available(),
        },
        # load_average (in machine) is read at the end and so includes this run; this one, before it.
        "load_average_before": load_before,
        "machine": machine_info(),
    }


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _loads(values: list[float] | None) -> str:
    return "-" if not values else " ".join(f"{v:.2f}" for v in values)


def format_report(report: dict) -> str:
    c, s, lat = report["config"], report["summary"], report["summary"]["latency_ms"]
    loop = (
        f"open loop {c['rate']:g} req/s (Poisson)"
        if c["loop"] == "open"
        else f"closed loop, {c['concurrency']} caller{'s' if c['concurrency'] != 1 else ''}"
    )
    bound = f"{c['requests']} requests" if c["requests"] else f"{c['duration']:g} s"
    lines = [
        f"cnnserve loadtest: {c['target']} {c['address']}, {loop}, {c['images_per_request']} image(s)/request, "
        f"{bound} after {c['warmup']:g} s warm-up, {c['processes']} client process(es)",
        f"  inputs    {report['inputs']['images_source']}; check: {report['inputs']['check']}",
        f"  requests  {s['ok']} ok, {s['errors']} errors in {s['window_s']:.2f} s: "
        f"{s['req_per_s']:.1f} req/s, {s['img_per_s']:.1f} img/s",
        f"  latency   p50 {_fmt(lat['p50'])}  p90 {_fmt(lat['p90'])}  p95 {_fmt(lat['p95'])}  "
        f"p99 {_fmt(lat['p99'])}  max {_fmt(lat['max'])}  mean {_fmt(lat['mean'])} ms",
    ]
    if s["dropped_arrivals"]:
        lines.append(
            f"  dropped   {s['dropped_arrivals']} arrivals not sent: --max-outstanding reached "
            "(the server cannot keep up with this rate)"
        )
    srv = report["server"]
    if srv:
        lines.append(
            f"  server    batch size mean {_fmt(srv['batch_size_mean'])}, queue wait mean "
            f"{_fmt(srv['queue_ms_mean'], 3)} ms, compute mean {_fmt(srv['compute_ms_mean'], 3)} ms/batch "
            f"({srv['batches']} batches, {srv['images']} images)"
        )
    else:
        lines.append(f"  server    no metrics ({report['server_scrape_error'] or 'scraping disabled'})")
    lines += [f"  WARNING   {w}" for w in report.get("server_warnings", [])]
    cl = report["client"]
    per = ", ".join(f"{p:.0f}%" for p in cl["cpu_percent_per_process"])
    lines.append(
        f"  client    CPU {cl['cpu_percent']:.0f}% of one core during the window ({per} per process; "
        f"{cl['cores_available']} cores available), {cl['cpu_percent_run']:.0f}% over the whole command; "
        f"{cl['event_loop']}"
    )
    if max(cl["cpu_percent_per_process"]) >= 85:
        lines.append(
            "  WARNING   a client process was near 100% of a core: the client may be the bottleneck "
            "(try --processes, or pin the client and the server to different cores)"
        )
    m = report["machine"]
    lines.append(
        f"  machine   load average {_loads(report.get('load_average_before'))} before, "
        f"{_loads(m['load_average'])} after (1/5/15 min; after includes this run), {m['cpu_count']} CPUs"
    )
    if report["errors_by_code"]:
        lines.append("  errors    " + ", ".join(f"{code}: {n}" for code, n in report["errors_by_code"].items()))
    return "\n".join(lines)


def csv_row(report: dict) -> dict:
    c, s, lat, srv, cl = (
        report["config"],
        report["summary"],
        report["summary"]["latency_ms"],
        report["server"] or {},
        report["client"],
    )
    return {
        "timestamp": report["timestamp"],
        "target": c["target"],
        "address": c["address"],
        "loop": c["loop"],
        "concurrency": "" if c["loop"] == "open" else c["concurrency"],
        "rate": c["rate"] or "",
        "images_per_request": c["images_per_request"],
        "processes": c["processes"],
        "warmup_s": c["warmup"],
        "window_s": round(s["window_s"], 4),
        "requests": s["requests"],
        "ok": s["ok"],
        "errors": s["errors"],
        "dropped_arrivals": s["dropped_arrivals"],
        "images": s["images"],
        "req_per_s": round(s["req_per_s"], 2),
        "img_per_s": round(s["img_per_s"], 2),
        **{
            f"latency_{name}_ms": "" if lat[name] is None else round(lat[name], 4)
            for name in ("mean", "p50", "p90", "p95", "p99", "max")
        },
        "server_batch_size_mean": _round(srv.get("batch_size_mean"), 3),
        "server_queue_ms_mean": _round(srv.get("queue_ms_mean"), 4),
        "server_compute_ms_mean": _round(srv.get("compute_ms_mean"), 4),
        "server_batches": srv.get("batches", ""),
        "client_cpu_percent": round(cl["cpu_percent"], 1),
        "client_cpu_percent_max_process": round(max(cl["cpu_percent_per_process"]), 1),
        "client_cpu_percent_run": round(cl["cpu_percent_run"], 1),
        "errors_by_code": ";".join(f"{k}:{v}" for k, v in report["errors_by_code"].items()),
    }


def _round(v, digits):
    return "" if v is None else round(v, digits)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def append_csv(report: dict, path: str | Path) -> None:
    """One row per run; the header is written when the file is new or empty."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(csv_row(report))
