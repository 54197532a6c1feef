"""Prometheus metrics, in a registry of their own per server instance.

In a multi-process server (``--workers`` > 1) every process writes its values to
prometheus-client's multiprocess folder (``PROMETHEUS_MULTIPROC_DIR``, private to the server and
made empty by the supervisor) and ``/metrics`` in any front end answers for the whole server:
counters and histograms summed, gauges combined as each one's ``multiprocess_mode`` says."""

from __future__ import annotations

import os
import time
from typing import Any, ClassVar

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

#: cnnserve_model_info's labels after model, version, provider and precision (model_info_labels).
PRECISION_LABELS = ("requested", "reason", "check_agreement", "speedup", "cpu_flags")


def model_info_labels(runtime: Any) -> list[str]:  # a ModelRuntime or a ModelDescription
    """cnnserve_model_info's label values for a loaded runtime (or a front end's description of
    one): what answers and the precision choice made at load (service/inference/precision.py)."""
    choice = getattr(runtime, "precision_choice", None) or {}
    agreement = choice.get("check_agreement")
    return [
        runtime.name,
        runtime.version,
        runtime.provider,
        getattr(runtime, "precision", "fp32"),  # a test's stand-in runtime may have none
        choice.get("requested", ""),
        choice.get("reason", ""),
        "" if agreement is None else f"{agreement:.4f}",
        ",".join(f"{n}:{t['speedup']:.2f}" for n, t in (choice.get("timing") or {}).items()),
        " ".join((choice.get("cpu") or {}).get("flags", [])),
    ]


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "cnnserve_requests",
            "Requests answered, by protocol, method and status code.",
            ["protocol", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cnnserve_request_duration_seconds",
            "Time from request received to response ready.",
            ["protocol", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "cnnserve_queue_duration_seconds",
            "Time a request waited for its batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "cnnserve_inference_duration_seconds",
            "Time to preprocess, run and post-process one batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "cnnserve_batch_size", "Images per executed batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "cnnserve_queue_depth",
            "Images waiting in the model's queue.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.images = Counter("cnnserve_images", "Images computed.", ["model"], registry=r)
        self.rejected = Counter("cnnserve_rejected", "Requests refused or dropped, by reason.", ["reason"], registry=r)
        self.grpc_penalties = Counter(
            "cnnserve_grpc_penalties",
            "Client addresses put in the gRPC port's penalty box for a cool-down (too many calls cancelled "
            "before their message: HTTP/2 rapid reset).",
            registry=r,
        )
        self.access_denied = Counter(
            "cnnserve_access_denied",
            "Requests refused for a missing, invalid or insufficient access key, by protocol, access group and "
            "reason (missing_key, invalid_key, forbidden).",
            ["protocol", "group", "reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "cnnserve_model_info",
            "Loaded model versions, the provider they run on, the precision variant that answers and why: "
            "the precision asked for, the reason, its top-1 agreement with fp32 on the check inputs and its "
            "speed-up over fp32 per batch size (batch:ratio), measured at load on this CPU (its flags).",
            ["model", "version", "provider", "precision", *PRECISION_LABELS],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Model control (service.model_control): what was loaded, refused and retired while serving.
        self.model_loads = Counter("cnnserve_model_loads", "Model version loads, by model and result (loaded, "
                                   "failed).", ["model", "result"], registry=r)  # fmt: skip
        self.model_unloads = Counter("cnnserve_model_unloads", "Model versions taken out of service.", ["model"],
                                     registry=r)  # fmt: skip
        self.model_version = Gauge("cnnserve_model_version", "The version a request naming none gets (the highest "
                                   "served); 0: the model is not served.", ["model"], registry=r,
                                   multiprocess_mode="livemax")  # fmt: skip
        self.explanations = Counter(
            "cnnserve_explanations", "Explanation requests computed, by attribution method.", ["method"], registry=r
        )
        self.explanations_active = Gauge(
            "cnnserve_explanations_active", "Explanations being computed now.", registry=r, multiprocess_mode="livesum"
        )
        self.explanations_waiting = Gauge(
            "cnnserve_explanations_waiting", "Explanations waiting for a turn.", registry=r, multiprocess_mode="livesum"
        )
        self.ready = Gauge(
            "cnnserve_ready", "1 when the server is ready for traffic.", registry=r, multiprocess_mode="livemin"
        )
        self.workers = Gauge(
            "cnnserve_workers", "Front-end processes serving requests.", registry=r, multiprocess_mode="livesum"
        )
        self.process_cpu = Counter(
            "cnnserve_process_cpu_seconds",
            "CPU time used, by server process (server, frontend-N, executor-N): per-process load.",
            ["process"],
            registry=r,
        )
        self._cpu_seen = 0.0
        self.process_name = "server"

    def record_process_cpu(self) -> None:
        """Add this process's CPU time since the last call (every thread's) to its counter."""
        now = time.process_time()
        self.process_cpu.labels(self.process_name).inc(max(0.0, now - self._cpu_seen))
        self._cpu_seen = now

    def exposition(self) -> bytes:
        """The text format for ``/metrics``: this process's registry, or every process's values in a
        multi-process server."""
        self.record_process_cpu()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class ModelStats:
    """Per-model-version counts and durations in Triton's statistics shape (nanoseconds), served by
    the Open Inference Protocol's statistics endpoints.

    The numbers live in one int64 vector, so that with several processes each writes its own row
    of a shared-memory table (one writer per row: no locks) and a reader sums the rows
    (:meth:`total`). Without a table the vector is private to the process."""

    FIELDS: tuple[str, ...] = (
        "success_count",
        "success_ns",
        "fail_count",
        "fail_ns",
        "queue_count",
        "queue_ns",
        "request_compute_count",
        "request_compute_ns",  # per request, Triton's meaning
        "inference_count",  # images computed
        "execution_count",  # batches run
        "last_inference_ms",
    )
    _INDEX: ClassVar[dict[str, int]] = {name: i for i, name in enumerate(FIELDS)}
    _LAST = _INDEX["last_inference_ms"]
    # (count, ns) positions, looked up once: request_done runs for every request.
    _SUCCESS = (_INDEX["success_count"], _INDEX["success_ns"])
    _FAIL = (_INDEX["fail_count"], _INDEX["fail_ns"])

    @classmethod
    def width(cls, max_batch_size: int) -> int:
        """Length of the vector: the fields, then [count, compute ns] per batch size 0..max."""
        return len(cls.FIELDS) + 2 * (max_batch_size + 1)

    def __init__(self, values: np.ndarray | None = None, max_batch_size: int = 1024) -> None:
        self.values = np.zeros(self.width(max_batch_size), np.int64) if values is None else values

    def __getattr__(self, name: str) -> int:
        index = ModelStats._INDEX.get(name)
        if index is None:
            raise AttributeError(name)
        return int(self.values[index])

    @classmethod
    def total(cls, rows: np.ndarray) -> ModelStats:
        """The sum of several processes' rows (the most recent ``last_inference_ms``)."""
        summed = rows.sum(axis=0)
        summed[cls._LAST] = rows[:, cls._LAST].max()
        return cls(summed)

    @property
    def batches(self) -> dict[int, list[int]]:
        """Batch size -> [count, compute ns], for the sizes that ran."""
        table = self.values[len(self.FIELDS) :].reshape(-1, 2)
        return {int(size): [int(c), int(ns)] for size, (c, ns) in enumerate(table) if c}

    def request_done(self, ok: bool, seconds: float) -> None:
        count, ns = self._SUCCESS if ok else self._FAIL
        v = self.values
        v[count] += 1
        v[ns] += int(seconds * 1e9)

    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None:
        v, i, ns = self.values, self._INDEX, int(compute_s * 1e9)
        # Triton charges every request of a batch the whole batch's compute time.
        v[i["request_compute_count"]] += requests
        v[i["request_compute_ns"]] += ns * requests
        v[i["queue_count"]] += len(queue_waits_s)
        v[i["queue_ns"]] += int(sum(queue_waits_s) * 1e9)
        v[i["inference_count"]] += size
        v[i["execution_count"]] += 1
        v[i["last_inference_ms"]] = int(time.time() * 1000)
        slot = len(self.FIELDS) + 2 * size
        if slot + 1 < len(v):
            v[slot] += 1
            v[slot + 1] += ns


class StatsObserver:
    """Feeds one model version's batcher events (``service.inference.batcher.Observer``) into the
    Prometheus metrics (label children resolved once) and into its ModelStats."""

    def __init__(self, metrics: Metrics, model: str, stats: ModelStats) -> None:
        self.metrics = metrics
        self.stats = stats
        self._depth = metrics.queue_depth.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._queue = metrics.queue_duration.labels(model)
        self._infer = metrics.inference_duration.labels(model)
        self._images = metrics.images.labels(model)

    def queue_depth(self, images: int) -> None:
        self._depth.set(images)

    def dropped(self, reason: str, images: int) -> None:
        self.metrics.rejected.labels(reason).inc()

    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None:
        self._batch.observe(size)
        self._infer.observe(compute_s)
        self._images.inc(size)
        for wait in queue_waits_s:
            self._queue.observe(wait)
        self.stats.batch_done(size, requests, queue_waits_s, compute_s)
