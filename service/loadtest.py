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
server's Prometheus /metrics, scraped at the start and the end of the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = ("grpc", "grpc-v2", "http", "http-v2")
DEFAULT_ADDRESS = {
    "grpc": "127.0.0.1:8001",
    "grpc-v2": "127.0.0.1:8001",
    "http": "127.0.0.1:8000",
    "http-v2": "127.0.0.1:8000",
}
DEFAULT_METRICS_URL = "http://127.0.0.1:8000/metrics"
DEFAULT_MODEL = "cifar10"
DEFAULT_MODEL_FILE = "models/cifar10/1/model.onnx"
# CIFAR-10's usual normalisation; used for v2 tensors only when the model file cannot be read.
FALLBACK_PREPROCESSING = {"scale": 1 / 255, "mean": [0.4912, 0.482, 0.4464], "std": [0.2453, 0.2429, 0.2606]}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASSIFY_METHOD = "/cnnserve.v1.Classifier/Classify"
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
PAYLOAD_BYTES_BUDGET = 256 * 1024 * 1024  # pre-built request bodies per process, at most
MAX_PAYLOADS = 1024
PERCENTILES = (50, 90, 95, 99)
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

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the run


class LoadTestError(RuntimeError):
    """Set-up failed (no server, a target the server lacks, bad images): nothing was measured."""


@dataclass
class LoadConfig:
    target: str = "grpc"
    address: str | None = None  # host:port; default by target
    concurrency: int = 1  # closed loop callers (all processes together)
    rate: float | None = None  # open loop requests/s (all processes together)
    duration: float | None = None  # measured seconds (default 10 unless requests is given)
    requests: int | None = None  # measured requests instead of a duration
    warmup: float = 1.0
    processes: int = 1
    images_per_request: int = 1
    images: str | None = None  # folder or .tar(.gz) of JPEG/PNG; None: generated
    generated: int = 64  # generated images when no folder is given
    max_images: int = 4096  # at most this many files are read from --images
    model: str | None = None  # Classify: empty = server default; v2: cifar10
    model_version: str = ""
    model_file: str = DEFAULT_MODEL_FILE  # preprocessing for the v2 tensors
    top_k: int | None = None
    timeout: float = 30.0
    max_outstanding: int = 10_000  # open loop, per process
    grpc_channels: int = 1  # per process (each its own TCP connection)
    http_client: str = "raw"  # raw (httptools) or aiohttp
    metrics_url: str | None = None  # None: derived; "none": do not scrape
    seed: int = 0
    progress: bool = True
    uvloop: bool = True

    def resolved_address(self) -> str:
        return self.address or DEFAULT_ADDRESS[self.target]

    def resolved_metrics_url(self) -> str | None:
        if self.metrics_url is not None:
            return None if self.metrics_url.lower() in ("", "none", "off") else self.metrics_url
        if self.target.startswith("http"):
            return f"http://{self.resolved_address()}/metrics"
        return DEFAULT_METRICS_URL

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r} (one of {', '.join(TARGETS)})")
        if self.processes < 1:
            raise ValueError("--processes must be >= 1")
        if self.open_loop:
            if not self.rate > 0:
                raise ValueError("--rate must be > 0")
        elif self.concurrency < self.processes:
            raise ValueError(f"--concurrency {self.concurrency} is less than --processes {self.processes}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be > 0")
        if self.requests is not None and self.requests < self.processes:
            raise ValueError("--requests must be >= --processes")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.images_per_request < 1:
            raise ValueError("--images-per-request must be >= 1")
        if self.http_client not in ("raw", "aiohttp"):
            raise ValueError("--http-client is raw or aiohttp")
        if self.grpc_channels < 1 or self.max_outstanding < 1 or self.timeout <= 0:
            raise ValueError("--grpc-channels, --max-outstanding and --timeout must be positive")


# ---- machine description (also used by bench/) -----------------------------------------------


def _package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def machine_info() -> dict:
    """What a benchmark figure depends on: CPU, cores, memory, load, Python and library versions."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_bytes": mem_total,
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": _package_version("onnxruntime-gpu", "onnxruntime"),
        "numpy": _package_version("numpy"),
        "grpcio": _package_version("grpcio"),
        "cnnserve": _package_version("cnnserve"),
        "gpus": _gpus(),
    }


def _gpus() -> list[str] | None:
    """NVIDIA GPUs as nvidia-smi names them (None where there is no nvidia-smi)."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def spread(values: list[float]) -> dict:
    """min / median / max of a few rounds (None when there are none)."""
    vals = sorted(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": vals[0], "median": float(np.median(vals)), "max": vals[-1], "n": len(vals)}


# ---- images and request bodies ---------------------------------------------------------------


def generate_images(n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """n different 32x32 JPEGs: smooth colour gradients plus noise (photo-like to the codec)."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        img = a * (1 - yy[..., None]) + b * xx[..., None] + c * 0.3 * (xx * yy)[..., None]
        img += rng.normal(0, 20, (32, 32, 3)).astype(np.float32)
        pixels = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
        out.append(simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB"))
    return out


def read_images(path: str, limit: int) -> list[bytes]:
    """JPEG/PNG files from a folder (recursively, sorted) or a .tar/.tar.gz archive."""
    import tarfile

    p = Path(path)
    out: list[bytes] = []
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_SUFFIXES and x.is_file()):
            out.append(f.read_bytes())
            if len(out) >= limit:
                break
    elif p.is_file() and tarfile.is_tarfile(p):
        with tarfile.open(p) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    data = tar.extractfile(member)
                    if data is not None:
                        out.append(data.read())
                        if len(out) >= limit:
                            break
    else:
        raise LoadTestError(f"--images {path}: not a folder or a tar archive")
    if not out:
        raise LoadTestError(f"--images {path}: no .jpg/.jpeg/.png files found")
    return out


def model_preprocessing(model_file: str | None) -> tuple[dict, str]:
    """The model's ``preprocessing`` metadata and where it came from."""
    if model_file and Path(model_file).is_file():
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            session = ort.InferenceSession(model_file, sess_options=so, providers=["CPUExecutionProvider"])
            pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
            return {k: pre[k] for k in ("scale", "mean", "std")}, model_file
        except Exception as e:
            return dict(FALLBACK_PREPROCESSING), f"fallback constants ({model_file}: {type(e).__name__}: {e})"
    return dict(FALLBACK_PREPROCESSING), f"fallback constants ({model_file} not found)"


def images_to_tensor(images: list[bytes], preprocessing: dict) -> np.ndarray:
    """Encoded images → float32 [n,3,32,32], exactly as the server would preprocess them."""
    from service.preprocess import image_to_tensor

    return np.concatenate([image_to_tensor(im, preprocessing) for im in images])


def _content_type(image: bytes) -> str:
    return "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"


@dataclass
class Payload:
    """One pre-built request: the body, and (HTTP) the headers that go with it."""

    body: bytes
    content_type: str | None = None
    extra_headers: dict = field(default_factory=dict)
    path: str = "/"


def _groups(n_items: int, k: int, budget_items: int, offset: int) -> list[list[int]]:
    """Index groups of k items (wrapping around), enough to use every item once, bounded."""
    count = max(1, min(MAX_PAYLOADS, -(-n_items // k), max(1, budget_items // k)))
    return [[(offset + g * k + j) % n_items for j in range(k)] for g in range(count)]


def build_payloads(cfg: LoadConfig, images: list[bytes], tensor: np.ndarray | None, offset: int = 0) -> list[Payload]:
    k = cfg.images_per_request
    target = cfg.target
    model = cfg.model or DEFAULT_MODEL
    if target == "grpc":
        from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb

        size = sum(len(im) for im in images) / len(images) * k
        out = []
        for group in _groups(len(images), k, int(PAYLOAD_BYTES_BUDGET / max(1.0, size)) * k, offset):
            req = pb.ClassifyRequest(
                images=[pb.Image(encoded=images[i]) for i in group],
                model=cfg.model or "",
                model_version=cfg.model_version,
            )
            if cfg.top_k is not None:
                req.top_k = cfg.top_k
            out.append(Payload(req.SerializeToString()))
        return out
    if target == "http":
        query = "&".join(
            f"{name}={value}"
            for name, value in (("top_k", cfg.top_k), ("model", cfg.model), ("version", cfg.model_version or None))
            if value is not None
        )
        path = "/predict" + (f"?{query}" if query else "")
        size = sum(len(im) for im in images) / len(images) * k
        out = []
        for gi, group in enumerate(_groups(len(images), k, int(PAYLOAD_BYTES_BUDGET / max(1.0, size)) * k, offset)):
            if k == 1:
                image = images[group[0]]
                out.append(Payload(image, _content_type(image), path=path))
                continue
            boundary = f"cnnserveloadtest{gi:08d}"
            parts = []
            for j, i in enumerate(group):
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{j}"\r\n'
                    f"Content-Type: {_content_type(images[i])}\r\n\r\n".encode()
                    + images[i]
                    + b"\r\n"
                )
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            out.append(Payload(body, f"multipart/form-data; boundary={boundary}", path=path))
        return out
    assert tensor is not None
    image_bytes = int(np.prod(tensor.shape[1:])) * 4
    groups = _groups(len(tensor), k, PAYLOAD_BYTES_BUDGET // image_bytes, offset)
    if target == "grpc-v2":
        from tritonclient.grpc import service_pb2 as tpb

        out = []
        for group in groups:
            x = np.ascontiguousarray(tensor[group])
            req = tpb.ModelInferRequest(model_name=model, model_version=cfg.model_version)
            inp = req.inputs.add()
            inp.name, inp.datatype = "input", "FP32"
            inp.shape.extend(x.shape)
            req.raw_input_contents.append(x.tobytes())
            out.append(Payload(req.SerializeToString()))
        return out
    # http-v2: JSON header + binary tensor (Triton binary tensor data extension), binary outputs.
    path = f"/v2/models/{model}" + (f"/versions/{cfg.model_version}" if cfg.model_version else "") + "/infer"
    out = []
    for group in groups:
        x = np.ascontiguousarray(tensor[group])
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            },
            separators=(",", ":"),
        ).encode()
        out.append(
            Payload(
                header + x.tobytes(),
                "application/octet-stream",
                {"Inference-Header-Content-Length": str(len(header))},
                path=path,
            )
        )
    return out


def raw_http_request(payload: Payload, host: str) -> bytes:
    head = [f"POST {payload.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(payload.body)}"]
    if payload.content_type:
        head.append(f"Content-Type: {payload.content_type}")
    head += [f"{k}: {v}" for k, v in payload.extra_headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload.body


# ---- one synchronous request before the run: is the target there, and does it answer right? ----


def check_target(cfg: LoadConfig, payload: Payload) -> str:
    """Send one request with a plain blocking client and check the answer's shape.
    Returns a one-line description; raises LoadTestError with the reason otherwise."""
    import urllib.error
    import urllib.request

    address, k, target = cfg.resolved_address(), cfg.images_per_request, cfg.target
    if target.startswith("grpc"):
        import grpc

        method = CLASSIFY_METHOD if target == "grpc" else MODEL_INFER_METHOD
        with grpc.insecure_channel(
            address, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        ) as channel:
            try:
                raw = channel.unary_unary(method)(payload.body, timeout=max(cfg.timeout, 10.0))
            except grpc.RpcError as e:
                hint = (
                    " (does this server have the Open Inference Protocol service?)"
                    if target == "grpc-v2" and e.code() == grpc.StatusCode.UNIMPLEMENTED
                    else ""
                )
                raise LoadTestError(f"{target} {address}: {e.code().name}: {e.details()}{hint}") from None
        if target == "grpc":
            from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb

            resp = pb.ClassifyResponse.FromString(raw)
            if len(resp.results) != k:
                raise LoadTestError(f"{target}: {len(resp.results)} results for {k} images")
            return f"model {resp.model}/{resp.model_version}, top-1 {resp.results[0].predictions[0].label!r}"
        from tritonclient.grpc import service_pb2 as tpb

        resp = tpb.ModelInferResponse.FromString(raw)
        shapes = {o.name: list(o.shape) for o in resp.outputs}
        if not shapes or any(s[:1] != [k] for s in shapes.values()):
            raise LoadTestError(f"{target}: unexpected outputs {shapes} for {k} images")
        return f"model {resp.model_name}/{resp.model_version}, outputs {shapes}"
    url = f"http://{address}{payload.path}"
    headers = dict(payload.extra_headers)
    if payload.content_type:
        headers["Content-Type"] = payload.content_type
    req = urllib.request.Request(url, data=payload.body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=max(cfg.timeout, 10.0)) as r:
            body, header_len = r.read(), r.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        hint = (
            " (does this server have the Open Inference Protocol endpoints?)"
            if target == "http-v2" and e.code in (404, 405)
            else ""
        )
        raise LoadTestError(f"{target} {url}: HTTP {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LoadTestError(f"{target} {url}: {getattr(e, 'reason', e)}") from None
    if target == "http":
        doc = json.loads(body)
        if len(doc.get("results", [])) != k:
            raise LoadTestError(f"{target}: {len(doc.get('results', []))} results for {k} images")
        return f"model {doc['model']}/{doc['model_version']}, top-1 {doc['results'][0]['predictions'][0]['label']!r}"
    doc = json.loads(body[: int(header_len)] if header_len else body)
    shapes = {o["name"]: o["shape"] for o in doc.get("outputs", [])}
    if not shapes or any(s[:1] != [k] for s in shapes.values()):
        raise LoadTestError(f"{target}: unexpected outputs {shapes} for {k} images")
    binary = "binary" if header_len else "JSON (the server ignored binary_data_output)"
    return f"model {doc.get('model_name')}/{doc.get('model_version')}, outputs {shapes} {binary}"


# ---- senders: one per target family, async, minimal work per request -------------------------


class GrpcSender:
    """grpc.aio with pass-through (de)serialisers: bodies are pre-serialised, answers are not parsed."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.method = CLASSIFY_METHOD if cfg.target == "grpc" else MODEL_INFER_METHOD
        self.channels: list = []
        self.calls: list = []
        self._rr = 0

    async def setup(self) -> None:
        import grpc

        self._rpc_error = grpc.aio.AioRpcError
        options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),
        ]  # one TCP connection per channel
        for _ in range(self.cfg.grpc_channels):
            channel = grpc.aio.insecure_channel(self.cfg.resolved_address(), options=options)
            await asyncio.wait_for(channel.channel_ready(), 10)
            self.channels.append(channel)
            self.calls.append(channel.unary_unary(self.method))

    def prepare(self, payloads: list[Payload]) -> list[bytes]:
        return [p.body for p in payloads]

    async def send(self, body: bytes, slot: int | None) -> str | None:
        calls = self.calls
        if slot is None:
            self._rr += 1
            slot = self._rr
        try:
            await calls[slot % len(calls)](body, timeout=self.cfg.timeout)
            return None
        except self._rpc_error as e:
            return e.code().name

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time; responses parsed by httptools."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self._parser_error = httptools.HttpParserError
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future | None = None
        self.lost = False
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self._parser_error as e:
            self._fail(ConnectionError(f"bad HTTP response: {e}"))
            self.transport.close()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._fail(ConnectionError("connection closed"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._fail(TimeoutError())
        self.lost = True
        self.transport.close()

    async def request(self, data: bytes, timeout: float) -> int:
        self.waiter = waiter = self.loop.create_future()
        self.transport.write(data)
        timer = self.loop.call_later(timeout, self._timed_out)
        try:
            return await waiter
        finally:
            timer.cancel()


class RawHttpSender:
    """Pre-rendered HTTP/1.1 requests over asyncio transports: one write per request, httptools
    parses the answer's status. A closed-loop caller keeps its own connection; the open loop
    takes an idle one from a pool or opens another."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        host, _, port = cfg.resolved_address().rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.conns: dict[int, _HttpConnection] = {}
        self.idle: list[_HttpConnection] = []
        self.all: list[_HttpConnection] = []

    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        (await self._connect()).transport.close()  # fail early if nobody listens

    def prepare(self, payloads: list[Payload]) -> list[bytes]:
        return [raw_http_request(p, self.cfg.resolved_address()) for p in payloads]

    async def _connect(self) -> _HttpConnection:
        _, conn = await self.loop.create_connection(lambda: _HttpConnection(self.loop), self.host, self.port)
        self.all.append(conn)
        return conn

    async def send(self, data: bytes, slot: int | None) -> str | None:
        conn = self.conns.get(slot) if slot is not None else None
        if conn is None or conn.lost or not conn.keep_alive:
            if slot is None:
                while self.idle:
                    conn = self.idle.pop()
                    if not conn.lost and conn.keep_alive:
                        break
                else:
                    conn = None
            else:
                conn = None
            if conn is None:
                try:
                    conn = await self._connect()
                except OSError as e:
                    await asyncio.sleep(0.01)  # a refused connect must not spin
                    return f"connect:{type(e).__name__}"
                if slot is not None:
                    self.conns[slot] = conn
        try:
            status = await conn.request(data, self.cfg.timeout)
        except TimeoutError:
            return "timeout"
        except ConnectionError:
            return "connection_lost"
        if slot is None:
            self.idle.append(conn)
        return None if status == 200 else str(status)

    async def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None and not conn.lost:
                conn.transport.close()
        await asyncio.sleep(0)


class AiohttpSender:
    """aiohttp.ClientSession, for a cross-check of the raw client's figures (more CPU per request)."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.base = f"http://{cfg.resolved_address()}"

    async def setup(self) -> None:
        import aiohttp

        self._errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            skip_auto_headers=("User-Agent",),
        )

    def prepare(self, payloads: list[Payload]) -> list[tuple]:
        out = []
        for p in payloads:
            headers = dict(p.extra_headers)
            if p.content_type:
                headers["Content-Type"] = p.content_type
            out.append((self.base + p.path, p.body, headers))
        return out

    async def send(self, item: tuple, slot: int | None) -> str | None:
        url, body, headers = item
        try:
            async with self.session.post(url, data=body, headers=headers) as r:
                await r.read()
                return None if r.status == 200 else str(r.status)
        except self._errors as e:
            return "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__

    async def close(self) -> None:
        await self.session.close()


def make_sender(cfg: LoadConfig):
    if cfg.target.startswith("grpc"):
        return GrpcSender(cfg)
    return AiohttpSender(cfg) if cfg.http_client == "aiohttp" else RawHttpSender(cfg)


# ---- one client process ----------------------------------------------------------------------


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Worker:
    """The callers (or the arrival process) of one client process."""

    def __init__(
        self,
        cfg: LoadConfig,
        index: int,
        concurrency: int,
        rate: float | None,
        requests: int | None,
        images: list[bytes],
        tensor: np.ndarray | None,
        counters,
    ) -> None:
        self.cfg, self.index = cfg, index
        self.concurrency, self.rate, self.tickets = concurrency, rate, requests
        self.requests_mode = requests is not None
        self.images, self.tensor = images, tensor
        self.counters = counters  # [completed, errors, latency seconds sum], read by the progress thread
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.dropped = 0
        self.last_done = 0.0
        self.cpu_start = self.cpu_end = None

    async def setup(self) -> None:
        payloads = build_payloads(self.cfg, self.images, self.tensor, offset=self.index * 7919)
        self.sender = make_sender(self.cfg)
        await self.sender.setup()
        self.items = self.sender.prepare(payloads)

    def _record(self, start: float, done: float, code: str | None) -> None:
        c = self.counters
        if code is None:
            c[0] += 1
            c[2] += done - start
        else:
            c[1] += 1
        if (start >= self.t0) if self.requests_mode else (self.t0 <= done < self.t1):
            if code is None:
                self.latencies.append(done - start)
            else:
                self.errors[code] = self.errors.get(code, 0) + 1
            if done > self.last_done:
                self.last_done = done

    def _snap_start(self) -> None:
        self.cpu_start = _cpu_seconds()

    def _snap_end(self) -> None:
        if self.cpu_end is None:
            self.cpu_end = _cpu_seconds()

    async def _closed(self, slot: int) -> None:
        send, record, items = self.sender.send, self._record, self.items
        n = len(items)
        i = (slot * 31) % n
        t0, t1 = self.t0, self.t1
        while True:
            t = now()
            if t >= t1:
                return
            if self.requests_mode and t >= t0:
                if self.tickets <= 0:
                    return
                self.tickets -= 1
            code = await send(items[i], slot)
            record(t, now(), code)
            i += 1
            if i == n:
                i = 0

    async def _one(self, item, scheduled: float) -> None:
        try:
            code = await self.sender.send(item, None)
        except Exception as e:
            code = type(e).__name__
        self._record(scheduled, now(), code)

    async def _open(self) -> None:
        rng = random.Random(self.cfg.seed * 1000 + self.index)
        items, n, i = self.items, len(self.items), 0
        tasks: set[asyncio.Task] = set()
        t = self.start + rng.expovariate(self.rate)
        t0, t1 = self.t0, self.t1
        limit = self.cfg.max_outstanding
        create_task = asyncio.get_running_loop().create_task
        stop = False
        try:
            while not stop:
                current = now()
                while t <= current:
                    if t >= t1 or (self.requests_mode and t >= t0 and self.tickets <= 0):
                        stop = True
                        break
                    if self.requests_mode and t >= t0:
                        self.tickets -= 1
                    if len(tasks) >= limit:
                        if t >= t0:
                            self.dropped += 1
                    else:
                        task = create_task(self._one(items[i], t))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        i += 1
                        if i == n:
                            i = 0
                    t += rng.expovariate(self.rate)
                if not stop:
                    await asyncio.sleep(max(0.0, t - now()))
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in list(tasks):
                task.cancel()
            raise

    async def run(self, start: float) -> dict:
        cfg = self.cfg
        self.start = start
        self.t0 = start + cfg.warmup
        self.t1 = math.inf if self.requests_mode and cfg.duration is None else self.t0 + (cfg.duration or 10.0)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start - now()))
        loop.call_later(max(0.0, self.t0 - now()), self._snap_start)
        if not math.isinf(self.t1):
            loop.call_later(max(0.0, self.t1 - now()), self._snap_end)
        if self.rate is not None:
            jobs = [loop.create_task(self._open())]
        else:
            jobs = [loop.create_task(self._closed(slot)) for slot in range(self.concurrency)]
        if self.requests_mode:
            _, pending = await asyncio.wait(
                jobs, timeout=None if math.isinf(self.t1) else self.t1 - now() + min(cfg.timeout, 5.0)
            )
        else:
            # Answers after the window do not count: give stragglers a moment, then stop.
            _, pending = await asyncio.wait(jobs, timeout=self.t1 - now() + min(cfg.timeout, 5.0))
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.wait(pending)
        if self.cpu_start is None:
            self._snap_start()
        self._snap_end()
        end = self.last_done if self.requests_mode else self.t1
        return {
            "index": self.index,
            "latencies": np.asarray(self.latencies, dtype=np.float64),
            "errors": self.errors,
            "dropped": self.dropped,
            "t0": self.t0,
            "end": end,
            "cpu_s": self.cpu_end - self.cpu_start,
            "cpu_window_s": (min(now(), self.t1) if self.requests_mode else self.t1) - self.t0,
        }

    async def close(self) -> None:
        await self.sender.close()


def _loop_runner(wanted: bool):
    """uvloop.run when uvloop is wanted and installed, else asyncio.run; and the loop's name."""
    if wanted:
        try:
            import uvloop

            return uvloop.run, "uvloop"
        except (ImportError, AttributeError):
            pass
    return asyncio.run, "asyncio"


def _split(total: float | int | None, parts: int, index: int, integer: bool = True):
    if total is None:
        return None
    if integer:
        return total // parts + (1 if index < total % parts else 0)
    return total / parts


def _worker_for(cfg: LoadConfig, index: int, images: list[bytes], tensor, counters) -> Worker:
    p = cfg.processes
    return Worker(
        cfg,
        index,
        concurrency=_split(cfg.concurrency, p, index),
        rate=_split(cfg.rate, p, index, integer=False),
        requests=_split(cfg.requests, p, index),
        images=images,
        tensor=tensor,
        counters=counters,
    )


def _child(cfg: LoadConfig, index: int, images: list[bytes], tensor, counters, ready_q, result_q, go, start) -> None:
    """Entry point of a client process (spawned): set up, report ready, wait for the common start."""
    runner, _ = _loop_runner(cfg.uvloop)

    async def main() -> dict:
        worker = _worker_for(cfg, index, images, tensor, counters)
        try:
            await worker.setup()
        except BaseException as e:
            ready_q.put((index, f"client set-up failed: {type(e).__name__}: {e}"))
            raise
        ready_q.put((index, None))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        if start.value < 0:
            await worker.close()
            return {"index": index, "aborted": True}
        try:
            return await worker.run(start.value)
        finally:
            await worker.close()

    try:
        result = runner(main())
    except BaseException as e:
        result = {"index": index, "error": f"{type(e).__name__}: {e}"}
    result_q.put(result)


# ---- server metrics --------------------------------------------------------------------------


def scrape_metrics(url: str, model: str | None = None, timeout: float = 5.0) -> dict:
    """_sum/_count of the batch size, queue wait and compute histograms, and images computed."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as r:
        text = r.read().decode()
    wanted = {"cnnserve_batch_size", "cnnserve_queue_duration_seconds", "cnnserve_inference_duration_seconds"}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in wanted or family.name == "cnnserve_images":
            for s in family.samples:
                if model and s.labels.get("model") not in (None, model):
                    continue
                if s.name.endswith(("_sum", "_count")) or s.name == "cnnserve_images_total":
                    out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def server_delta(before: dict | None, after: dict | None) -> dict | None:
    if not before or not after:
        return None

    def d(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    batches = d("cnnserve_batch_size_count")
    queued = d("cnnserve_queue_duration_seconds_count")
    return {
        "batches": int(batches),
        "images": int(d("cnnserve_batch_size_sum")),
        "batch_size_mean": d("cnnserve_batch_size_sum") / batches if batches else None,
        "queue_ms_mean": 1000 * d("cnnserve_queue_duration_seconds_sum") / queued if queued else None,
        "compute_ms_mean": 1000 * d("cnnserve_inference_duration_seconds_sum") / batches if batches else None,
    }


class Monitor(threading.Thread):
    """Progress line once a second; metrics scraped at the window's start and end."""

    def __init__(self, cfg: LoadConfig, counters: list, start: float) -> None:
        super().__init__(name="loadtest-monitor", daemon=True)
        self.cfg, self.counters, self.start_at = cfg, counters, start
        self.t0 = start + cfg.warmup
        self.t1 = None if cfg.requests is not None and cfg.duration is None else self.t0 + (cfg.duration or 10.0)
        self.url = cfg.resolved_metrics_url()
        self.done = threading.Event()
        self.before = self.after = None
        self.scrape_error: str | None = None
        self._after_taken = threading.Event()

    def _scrape(self) -> dict | None:
        if self.url is None:
            return None
        try:
            return scrape_metrics(self.url, self.cfg.model)
        except Exception as e:
            self.scrape_error = f"{self.url}: {type(e).__name__}: {e}"
            return None

    def _totals(self) -> tuple[float, float, float]:
        return (sum(c[0] for c in self.counters), sum(c[1] for c in self.counters), sum(c[2] for c in self.counters))

    def run(self) -> None:
        k = self.cfg.images_per_request
        last = self._totals()
        tick = self.start_at + 1.0
        took_before = False
        while True:
            events = [tick]
            if not took_before:
                events.append(self.t0)
            if self.t1 is not None and self.after is None:
                events.append(self.t1)
            wait = min(events) - now()
            if self.done.wait(max(0.0, wait)):
                break
            t = now()
            if not took_before and t >= self.t0:
                self.before = self._scrape()
                took_before = True
            if self.t1 is not None and self.after is None and t >= self.t1:
                self.after = self._scrape()
                self._after_taken.set()
            if t >= tick:
                cur = self._totals()
                ok, err, lat = (cur[i] - last[i] for i in range(3))
                last = cur
                phase = "warm-up" if t < self.t0 else ("run" if self.t1 is None or t < self.t1 else "finishing")
                if self.cfg.progress:
                    mean = f"{1000 * lat / ok:8.2f} ms" if ok else "      -   "
                    print(
                        f"[{t - self.start_at:6.1f}s] {phase:9s} {ok:8.0f} req/s {ok * k:9.0f} img/s  "
                        f"mean {mean}  errors {err:.0f}  (total {cur[0]:.0f} ok, {cur[1]:.0f} errors)",
                        file=sys.stderr,
                        flush=True,
                    )
                tick += 1.0
        if not took_before:
            self.before = self._scrape()
        if self.after is None:
            self.after = self._scrape()

    def finish(self) -> None:
        self.done.set()
        self.join()


# ---- the run ---------------------------------------------------------------------------------


def prepare_inputs(cfg: LoadConfig) -> tuple[list[bytes], np.ndarray | None, dict]:
    """Images (read or generated) and, for v2 targets, their preprocessed tensor."""
    info: dict[str, Any] = {}
    if cfg.images:
        images = read_images(cfg.images, cfg.max_images)
        info["images_source"] = f"{cfg.images} ({len(images)} files)"
    else:
        images = generate_images(cfg.generated, cfg.seed)
        info["images_source"] = f"generated ({len(images)} random 32x32 JPEGs)"
    info["image_bytes_mean"] = round(sum(len(im) for im in images) / len(images), 1)
    tensor = None
    if cfg.target.endswith("v2"):
        pre, source = model_preprocessing(cfg.model_file)
        try:
            tensor = images_to_tensor(images, pre)
        except Exception as e:
            raise LoadTestError(f"cannot decode the images for a v2 tensor: {type(e).__name__}: {e}") from None
        info["preprocessing"] = {**pre, "source": source}
    return images, tensor, info


def run(cfg: LoadConfig) -> dict:
    """Run one load test and return its report (see ``format_report``). Raises LoadTestError when
    nothing could be measured; ValueError for a bad configuration."""
    cfg.validate()
    if cfg.duration is None and cfg.requests is None:
        cfg.duration = 10.0
    wall_start, cpu_start = now(), _cpu_seconds() + _cpu_seconds(resource.RUSAGE_CHILDREN)
    images, tensor, info = prepare_inputs(cfg)
    k = cfg.images_per_request
    first = build_payloads(cfg, images[:k], None if tensor is None else tensor[:k], 0)[0]
    info["check"] = check_target(cfg, first)

    if cfg.processes == 1:
        counters = [[0.0, 0.0, 0.0]]
        runner, loop_kind = _loop_runner(cfg.uvloop)
        monitor_box: list[Monitor] = []

        async def single() -> list[dict]:
            worker = _worker_for(cfg, 0, images, tensor, counters[0])
            try:
                await worker.setup()
            except Exception as e:
                raise LoadTestError(f"client set-up failed: {type(e).__name__}: {e}") from None
            start = now() + 0.05
            monitor = Monitor(cfg, counters, start)
            monitor_box.append(monitor)
            monitor.start()
            try:
                return [await worker.run(start)]
            finally:
                await worker.close()

        try:
            results = runner(single())
        finally:
            for m in monitor_box:
                m.finish()
        monitor = monitor_box[0]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        counters = [ctx.RawArray("d", 3) for _ in range(cfg.processes)]
        ready_q, result_q, go, start_value = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.RawValue("d", -1.0)
        procs = [
            ctx.Process(
                target=_child,
                name=f"loadtest-{i}",
                daemon=True,
                args=(cfg, i, images, tensor, counters[i], ready_q, result_q, go, start_value),
            )
            for i in range(cfg.processes)
        ]
        for p in procs:
            p.start()
        loop_kind = _loop_runner(cfg.uvloop)[1]
        problems = []
        try:
            for _ in procs:
                index, problem = ready_q.get(timeout=120)
                if problem:
                    problems.append(f"process {index}: {problem}")
        except Exception as e:
            problems.append(f"client processes did not start: {type(e).__name__}")
        if problems:
            go.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            raise LoadTestError("; ".join(problems))
        start = now() + 0.1
        start_value.value = start
        monitor = Monitor(cfg, counters, start)
        monitor.start()
        go.set()
        results = []
        limit = cfg.warmup + (cfg.duration or 0) + (cfg.timeout if cfg.requests else 0) + 120
        try:
            for _ in procs:
                results.append(result_q.get(timeout=limit if cfg.duration else None))
        finally:
            monitor.finish()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise LoadTestError("client process failed: " + "; ".join(failed))
        results.sort(key=lambda r: r["index"])

    wall = now() - wall_start
    cpu_run = _cpu_seconds() + _cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start
    return _report(cfg, results, monitor, info, loop_kind, wall, cpu_run)


def _report(
    cfg: LoadConfig, results: list[dict], monitor: Monitor, info: dict, loop_kind: str, wall: float, cpu_run: float
) -> dict:
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
    config["metrics_url"] = cfg.resolved_metrics_url()
    config["loop"] = "open" if cfg.open_loop else "closed"
    return {
        "tool": "cnnserve loadtest",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
        "inputs": info,
        "summary": summary,
        "errors_by_code": dict(sorted(errors.items())),
        "server": server_delta(monitor.before, monitor.after),
        "server_scrape_error": monitor.scrape_error,
        "client": {
            "event_loop": loop_kind,
            "processes": cfg.processes,
            # CPU of the client processes over the measured window; 100 = one core busy.
            "cpu_percent": sum(cpu_percent),
            "cpu_percent_per_process": cpu_percent,
            # getrusage(self + children) over the whole command, set-up included.
            "cpu_percent_run": 100.0 * cpu_run / max(wall, 1e-9),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        },
        "machine": machine_info(),
    }


# ---- output ----------------------------------------------------------------------------------


def _fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


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
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(csv_row(report))


# ---- command line ----------------------------------------------------------------------------


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
        "--metrics-url",
        default=None,
        help=f"the server's Prometheus endpoint, scraped before and after the window (default: "
        f"http://ADDRESS/metrics for HTTP targets, {DEFAULT_METRICS_URL} otherwise; 'none': skip)",
    )
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
        "for a cross-check (default raw)",
    )
    p.add_argument(
        "--grpc-channels",
        type=int,
        default=1,
        help="gRPC channels (TCP connections) per process, used round-robin (default 1)",
    )
    p.add_argument("--no-uvloop", dest="uvloop", action="store_false", help="use asyncio's own event loop")
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


def main(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        report = run(cfg)
    except (LoadTestError, ValueError) as e:
        print(f"cnnserve loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cnnserve loadtest: interrupted", file=sys.stderr)
        return 130
    print(format_report(report))
    if args.json_path:
        write_json(report, args.json_path)
    if args.csv_path:
        append_csv(report, args.csv_path)
    s = report["summary"]
    if s["ok"] == 0:
        print("cnnserve loadtest: no request succeeded", file=sys.stderr)
        return 1
    if args.fail_on_error and s["errors"]:
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="cnnserve loadtest")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
