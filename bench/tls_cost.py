"""What TLS and access keys cost: the same load against three servers started side by side.

Servers (subprocesses, 127.0.0.1, ephemeral ports, CPU provider, one front end, one intra-op
thread): ``plain`` (no TLS, everything open), ``tls`` (TLS on both ports) and ``tls+keys`` (TLS,
every group but health restricted, so each request also passes the key check). For several
rounds, in an order that rotates from round to round, ``cnnserve loadtest`` (closed loop, one
image per request, kept-alive connections) runs against each server on gRPC Classify and HTTP
/predict. Then new TLS handshakes per second on each port (one connection per handshake, from
this process), which is what clients that do not keep connections pay.

Prints min / median / max over the rounds of requests/s and p50 latency per point, the
median's change against ``plain``, and the server's CPU time per request (from /proc: the
process's user + system time over the point, divided by the requests its /metrics counted). On a
machine shared with other work, requests/s swings with the neighbours' load; CPU time per
request is what TLS adds to each request and holds far better.

    .venv/bin/python bench/tls_cost.py                # 3 rounds x 4 s per point (about 2 minutes)
    .venv/bin/python bench/tls_cost.py --quick        # 1 round x 2 s

Writes bench/results/tls-cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.served import run_loadtest  # noqa: E402
from bench.serverproc import ServerProcess  # noqa: E402
from loadtest.machine import machine_info  # noqa: E402
from tests.certs import make_tls  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def server_sample(server: ServerProcess, ca: Path | None) -> tuple[float, float]:
    """(CPU seconds the server process has used, requests it has answered)."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    scheme = "https" if ca else "http"
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    request = urllib.request.Request(f"{scheme}://{server.http_address}/metrics", headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=10, context=context) as r:
        text = r.read().decode()
    answered = sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "cnnserve_requests"
        for s in f.samples
        if s.name.endswith("_total") and s.labels.get("method") in ("Classify", "predict")
    )
    return cpu, answered


def handshakes_per_s(port: int, ca: Path, alpn: str, seconds: float) -> float:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols([alpn])
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", port)) as raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            n += 1
    return n / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "tls-cost.json"), help="where to write")
    args = ap.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (2.0 if args.quick else 4.0)

    tmp = Path(tempfile.mkdtemp(prefix="tls-cost-"))
    tls = make_tls(tmp / "tls")
    tls_args = ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key)]
    common = ["--workers", "1", "--executor", "worker", "--intra-op-threads", "1", "--drain-seconds", "0"]
    configs = {
        "plain": ([], []),
        "tls": (tls_args, ["--cacert", str(tls.ca)]),
        "tls+keys": ([*tls_args, "--restricted-apis", "all"], ["--cacert", str(tls.ca)]),
    }
    os.environ["CNNSERVE_ACCESS_KEYS"] = KEY  # the servers' keys; CNNSERVE_ACCESS_KEY: the clients'
    os.environ["CNNSERVE_ACCESS_KEY"] = KEY
    servers = {name: ServerProcess(*common, *server_args) for name, (server_args, _) in configs.items()}
    results: dict[str, list[dict]] = {}
    try:
        points = [(name, protocol) for protocol in ("grpc", "http") for name in configs]
        for r in range(rounds):
            order = points[r % len(points) :] + points[: r % len(points)]
            for name, protocol in order:
                ca = tls.ca if name != "plain" else None
                cpu0, answered0 = server_sample(servers[name], ca)
                report = run_loadtest(servers[name], protocol, args.concurrency, duration, 1.0,
                                      extra=configs[name][1])  # fmt: skip
                cpu1, answered1 = server_sample(servers[name], ca)
                s = report["summary"]
                results.setdefault(f"{protocol} {name}", []).append(
                    {"req_per_s": s["req_per_s"], "p50_ms": s["latency_ms"]["p50"], "errors": s["errors"],
                     "cpu_ms_per_request": 1000.0 * (cpu1 - cpu0) / max(1.0, answered1 - answered0)}
                )  # fmt: skip
        handshakes = {
            f"{protocol} tls": handshakes_per_s(port, tls.ca, alpn, duration)
            for protocol, port, alpn in (
                ("http", servers["tls"].http_port, "http/1.1"),
                ("grpc", servers["tls"].grpc_port, "h2"),
            )
        }
    finally:
        for s in servers.values():
            s.stop()

    summary = {}
    print(f"closed loop, {args.concurrency} callers, 1 image/request, {rounds} round(s) x {duration:g} s")
    for point, runs in results.items():
        rps = [x["req_per_s"] for x in runs]
        p50 = [x["p50_ms"] for x in runs]
        cpu = [x["cpu_ms_per_request"] for x in runs]
        summary[point] = {"req_per_s_median": statistics.median(rps), "p50_ms_median": statistics.median(p50),
                          "cpu_ms_per_request_median": statistics.median(cpu), "cpu_ms_per_request": cpu,
                          "req_per_s": rps, "p50_ms": p50, "errors": sum(x["errors"] for x in runs)}  # fmt: skip
    for point, s in summary.items():
        protocol = point.split()[0]
        base = summary[f"{protocol} plain"]["req_per_s_median"]
        change = 100.0 * (s["req_per_s_median"] / base - 1.0)
        s["change_vs_plain_percent"] = change
        base_cpu = summary[f"{protocol} plain"]["cpu_ms_per_request_median"]
        s["cpu_change_vs_plain_percent"] = cpu_change = 100.0 * (s["cpu_ms_per_request_median"] / base_cpu - 1.0)
        print(f"  {point:15s} req/s {min(s['req_per_s']):7.0f} / {s['req_per_s_median']:7.0f} / "
              f"{max(s['req_per_s']):7.0f}  p50 {s['p50_ms_median']:6.2f} ms  vs plain {change:+5.1f}%   "
              f"server CPU/request {min(s['cpu_ms_per_request']):.3f} / {s['cpu_ms_per_request_median']:.3f} / "
              f"{max(s['cpu_ms_per_request']):.3f} ms  vs plain {cpu_change:+5.1f}%")  # fmt: skip
    for point, rate in handshakes.items():
        print(f"  new {point} handshakes/s (one client thread): {rate:.0f}")
    out = Path(args.json).resolve()
    out.write_text(json.dumps({"benchmark": "tls_cost", "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               "command": " ".join(sys.argv), "concurrency": args.concurrency, "rounds": rounds,
                               "duration_s": duration, "points": summary, "handshakes_per_s": handshakes,
                               "machine": machine_info()}, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
