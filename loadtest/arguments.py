"""``cnnserve loadtest``: drive a running server and report throughput, latency and batching.

Loops:
- closed (default): ``--concurrency N`` callers, each sends its next request as soon as the last
  one is answered;
- open: ``--rate R`` requests/s with Poisson arrivals, whatever the server's speed. Latency is
  counted from each request's *scheduled* arrival, so a server (or client) that falls behind shows
  it in the latency instead of hiding it ("coordinated omission"). Arrivals are fired on a ~1 ms
  timer, so at rates above ~1000/s several leave together. When ``--max-outstanding`` requests
  are already waiting, an arrival is not sent and is counted as dropped.

Targets: ``grpc`` (cnnserve.v1.Classifier/Classify, encoded images), ``grpc-v2`` (Open
Inference Protocol ModelInfer, FP32 tensor in raw_input_contents), ``http`` (POST /predict with
an image/jpeg or image/png body; multipart when several images per request) and ``http-v2`` (POST
/v2/models/<model>/infer with the binary tensor extension, binary outputs).

Images come from ``--images`` (a folder or a .tar/.tar.gz of JPEG/PNG files) or are generated
once up front (smooth random 32x32 scenes, JPEG-encoded). The v2 targets send them decoded and
normalised with the model's own preprocessing (the ``preprocessing`` metadata of
``--model-file``, falling back to CIFAR-10's standard constants). Every request body is built and
serialised once before the run; a request then costs one write and one parse of the status.

Bounds: ``--duration`` seconds (default 10) or ``--requests`` N, after ``--warmup`` seconds that
are not counted. With ``--duration``, a request counts if it completes inside the window
(throughput = completions / window); with ``--requests``, the first N requests sent after the
warm-up count and the window ends at the last one's answer.

``--processes P`` splits the callers (or the rate) over P client processes, each with its own
event loop, started together; their results are merged. Use it when one process's CPU use — shown
in the report — nears 100% of a core: then the client, not the server, is the limit.

Server-side figures (mean batch size, mean queue wait, mean compute per batch) come from the
server's Prometheus /metrics, scraped at the start and the end of the measured window: for HTTP
targets at the target's own address; for gRPC targets at --metrics-address, or, when the target is
on the default gRPC port 8001, the same host's port 8000. The report warns when the metrics read
are not this run's: the model that answered is not among the server's cnnserve_model_info, or its
request counter grew by much less (another server) or much more (other clients) than was sent.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from loadtest.config import DEFAULT_MODEL, DEFAULT_MODEL_FILE, TARGETS, LoadConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    p = parser.add_argument_group("target")
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="grpc",
        help="grpc: Classify; grpc-v2: ModelInfer; http: POST /predict; http-v2: POST /v2/.../infer (default grpc)",
    )
    p.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="server address (default 127.0.0.1:8001 for gRPC targets, 127.0.0.1:8000 for HTTP)",
    )
    p.add_argument(
        "--model", default=None, help=f"model name (Classify/predict: the server's default; v2: {DEFAULT_MODEL})"
    )
    p.add_argument("--model-version", default="", help="model version (default: the highest)")
    p.add_argument("--top-k", type=int, default=None, help="labels per image for grpc/http (server default)")
    p.add_argument(
        "--metrics-address",
        default=None,
        metavar="HOST:PORT",
        help="the server's HTTP address (or a full URL) whose /metrics are scraped before and after the "
        "window. Default: the target for HTTP targets; for gRPC targets the same host's port 8000 when the "
        "target's port is 8001, else none (gRPC does not tell the HTTP port). 'none': skip",
    )
    # The flag's former name, kept so existing scripts keep working.
    p.add_argument("--metrics-url", dest="metrics_address", default=None, help=argparse.SUPPRESS)
    p = parser.add_argument_group("load")
    p.add_argument("--concurrency", "-c", type=int, default=1, help="closed loop: callers in flight (default 1)")
    p.add_argument(
        "--rate",
        "-r",
        type=float,
        default=None,
        help="open loop: Poisson arrivals at this many requests/s (replaces --concurrency)",
    )
    p.add_argument("--duration", "-d", type=float, default=None, help="measured seconds (default 10)")
    p.add_argument("--requests", "-n", type=int, default=None, help="measure this many requests instead")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    p.add_argument("--images-per-request", "-k", type=int, default=1, help="images in each request (default 1)")
    p.add_argument(
        "--processes",
        "-p",
        type=int,
        default=1,
        help="client processes, each with its own event loop; callers/rate are split (default 1)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=10_000,
        help="open loop: most requests in flight per process; later arrivals are dropped (default 10000)",
    )
    p = parser.add_argument_group("inputs")
    p.add_argument(
        "--images",
        default=None,
        metavar="PATH",
        help="folder (recursive) or .tar/.tar.gz of JPEG/PNG files (default: generated images)",
    )
    p.add_argument("--max-images", type=int, default=4096, help="read at most this many files (default 4096)")
    p.add_argument("--generated", type=int, default=64, help="images to generate without --images (default 64)")
    p.add_argument(
        "--model-file",
        default=DEFAULT_MODEL_FILE,
        help=f"ONNX file whose 'preprocessing' metadata normalises v2 tensors (default "
        f"{DEFAULT_MODEL_FILE}; CIFAR-10 constants when absent)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for generated images and arrivals (default 0)")
    p = parser.add_argument_group("client")
    p.add_argument(
        "--http-client",
        choices=("raw", "aiohttp"),
        default="raw",
        help="raw: pre-rendered HTTP/1.1 over asyncio + httptools (least client CPU); aiohttp: "
        "for a cross-check, needs the loadtest extra: pip install 'cnnserve[loadtest]' (default raw)",
    )
    p.add_argument(
        "--grpc-channels",
        type=int,
        default=1,
        help="gRPC channels (TCP connections) per process, used round-robin (default 1)",
    )
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="use asyncio's own event loop")
    from service.security.client import add_arguments as add_security_arguments

    add_security_arguments(parser.add_argument_group("TLS and access key (also for the /metrics scrape)"))
    p = parser.add_argument_group("output")
    p.add_argument("--json", dest="json_path", metavar="PATH", default=None, help="write the full report as JSON")
    p.add_argument(
        "--csv",
        dest="csv_path",
        metavar="PATH",
        default=None,
        help="append one row of summary columns (header when the file is new)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    names = {f.name for f in fields(LoadConfig)}
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    given["progress"] = not getattr(args, "quiet", False)
    return LoadConfig(**given)
