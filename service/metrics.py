"""Prometheus metrics, in a registry of their own per server instance."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.batcher import BatchObserver

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
        self.queue_depth = Gauge("cnnserve_queue_depth", "Images waiting in the model's queue.", ["model"], registry=r)
        self.images = Counter("cnnserve_images", "Images computed.", ["model"], registry=r)
        self.rejected = Counter("cnnserve_rejected", "Requests refused or dropped, by reason.", ["reason"], registry=r)
        self.model_info = Gauge(
            "cnnserve_model_info",
            "Loaded model versions and the provider they run on.",
            ["model", "version", "provider"],
            registry=r,
        )
        self.explanations = Counter(
            "cnnserve_explanations", "Explanation requests computed, by attribution method.", ["method"], registry=r
        )
        self.explanations_active = Gauge("cnnserve_explanations_active", "Explanations being computed now.", registry=r)
        self.explanations_waiting = Gauge(
            "cnnserve_explanations_waiting", "Explanations waiting for a turn.", registry=r
        )
        self.ready = Gauge("cnnserve_ready", "1 when the server is ready for traffic.", registry=r)

    def observer(self, model: str) -> ModelObserver:
        return ModelObserver(self, model)


class ModelObserver(BatchObserver):
    """Feeds one model's batcher events into the metrics (label children resolved once)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self._depth = metrics.queue_depth.labels(model)
        self._batch = metrics.batch_size.labels(model)
        self._queue = metrics.queue_duration.labels(model)
        self._infer = metrics.inference_duration.labels(model)
        self._images = metrics.images.labels(model)

    def queue_depth(self, images: int) -> None:
        self._depth.set(images)

    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None:
        self._batch.observe(size)
        self._infer.observe(compute_s)
        self._images.inc(size)
        for wait in queue_waits_s:
            self._queue.observe(wait)

    def dropped(self, reason: str, images: int) -> None:
        self.metrics.rejected.labels(reason).inc()


class ModelStats:
    """Per-model-version counts and durations in Triton's statistics shape (nanoseconds),
    served by the Open Inference Protocol's statistics endpoints."""

    def __init__(self) -> None:
        self.success_count = self.success_ns = 0
        self.fail_count = self.fail_ns = 0
        self.queue_count = self.queue_ns = 0
        self.compute_count = self.compute_ns = 0  # per executed batch
        self.request_compute_count = self.request_compute_ns = 0  # per request, Triton's meaning
        self.inference_count = 0  # images computed
        self.execution_count = 0  # batches run
        self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = {}  # batch size -> [count, compute ns]

    def request_done(self, ok: bool, seconds: float) -> None:
        if ok:
            self.success_count += 1
            self.success_ns += int(seconds * 1e9)
        else:
            self.fail_count += 1
            self.fail_ns += int(seconds * 1e9)


class StatsObserver(ModelObserver):
    """ModelObserver that also keeps the model's ModelStats."""

    def __init__(self, metrics: Metrics, model: str, stats: ModelStats) -> None:
        super().__init__(metrics, model)
        self.stats = stats

    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None:
        super().batch_done(size, requests, queue_waits_s, compute_s)
        s = self.stats
        ns = int(compute_s * 1e9)
        s.compute_count += 1
        s.compute_ns += ns
        # Triton charges every request of a batch the whole batch's compute time.
        s.request_compute_count += requests
        s.request_compute_ns += ns * requests
        s.queue_count += len(queue_waits_s)
        s.queue_ns += int(sum(queue_waits_s) * 1e9)
        s.inference_count += size
        s.execution_count += 1
        s.last_inference_ms = int(time.time() * 1000)
        entry = s.batches.setdefault(size, [0, 0])
        entry[0] += 1
        entry[1] += ns
