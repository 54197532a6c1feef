"""The protocol-agnostic core: model lookup, validation, decoding, batching, top-k.

Every transport (HTTP /predict, gRPC Classify, both Open Inference Protocol bindings) calls
these methods and translates ``service.errors`` exceptions with the maps in that module; none of
them validates or batches on its own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from service.errors import (
    BufferFull,
    DeadlineExceeded,
    InvalidInput,
    InvalidParameter,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
)
from service.explain.explainer import Explainer, Explanations
from service.explain.layers import LayerModel
from service.inference import codec, priority, repository
from service.inference.batcher import Batcher
from service.inference.model_description import ModelDescription
from service.inference.runtime import BatchOutput, ModelRuntime, load_model
from service.metrics import Metrics, ModelStats, StatsObserver
from service.settings import Settings
from service.workers.remote_batcher import ExecutorClient, RemoteBatcher
from service.workers.shared_memory import ControlTable

log = logging.getLogger("cnnserve.core")
T = TypeVar("T")

MAX_TOP_K = 10
# Small JPEGs, PNGs and raw images are decoded on the event loop (tens of microseconds: a thread
# hand-off would cost more): their cost is bounded by their size in bytes and their header's pixel
# count (PNG text chunks are capped in codec). Anything larger, or of another format, is decoded in
# the core's own bounded pool so that one big photo (or a small file that inflates to many pixels)
# cannot stall every other request.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 256 * 256
MAX_DECODE_THREADS = 4


class _CallerGone(Exception):
    """Raised in a decoding thread whose caller went away: the result would be thrown away."""


def decode_thread_count(settings: Settings) -> int:
    if settings.decode_threads:
        return settings.decode_threads
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_DECODE_THREADS, usable))


@dataclass(frozen=True)
class RawImage:
    """Interleaved RGB uint8 pixels."""

    data: bytes
    height: int
    width: int


ImageInput = bytes | RawImage


@dataclass
class LoadedModel:
    """A model version as the transports see it. ``runtime`` is the ONNX Runtime session, or the
    description of one that runs in a device executor; ``batcher`` its queue (local or remote);
    ``stats`` this process's statistics, ``stats_rows`` every process's (multi-process server)."""

    runtime: ModelRuntime | ModelDescription
    batcher: Batcher[BatchOutput] | RemoteBatcher
    stats: ModelStats
    decoding: int = 0  # images admitted and being decoded: counted against the queue by admit()
    stats_rows: np.ndarray | None = None

    def stats_total(self) -> ModelStats:
        """Statistics of this model version summed over the server's processes."""
        return self.stats if self.stats_rows is None else ModelStats.total(self.stats_rows)

    @property
    def name(self) -> str:
        return self.runtime.name

    @property
    def version(self) -> str:
        return self.runtime.version


@dataclass(frozen=True)
class Classification:
    """Top-k of every image of a request, in request order."""

    model: str
    version: str
    indices: list[list[int]]  # [n][k]
    probabilities: list[list[float]]  # [n][k]
    labels: list[list[str]]  # [n][k]


class InferenceCore:
    """``table``/``row``: in a multi-process server, the shared control table and this process's
    row in it (readiness and statistics then cover every process)."""

    def __init__(self, settings: Settings, metrics: Metrics, table: ControlTable | None = None, row: int = 0) -> None:
        self.settings = settings
        self.metrics = metrics
        self.table, self.row = table, row
        self.models: dict[str, dict[str, LoadedModel]] = {}
        self._runtimes: list[ModelRuntime] = []
        #: Companion sessions with the named intermediate activations (service.explain.layers), for the
        #: model versions whose folder holds a layers.onnx.
        self.layer_models: dict[tuple[str, str], LayerModel] = {}
        self.ready = False
        self.draining = False
        self._decode_pool = ThreadPoolExecutor(decode_thread_count(settings), thread_name_prefix="decode")
        self.buffered_bytes = 0  # request bytes held in memory by requests in progress (HTTP and gRPC)
        self.explainer = Explainer(self)

    # ---- life cycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Create and warm up a session per model version (blocking: run it in a thread)."""
        for spec in repository.scan(self.settings.model_repository):
            started = time.monotonic()
            runtime = load_model(spec, self.settings)
            log.info(
                "loaded %s/%s from %s (%s) on %s in %.2fs",
                spec.name,
                spec.version,
                runtime.path,
                runtime.precision,
                runtime.provider,
                time.monotonic() - started,
            )
            self._runtimes.append(runtime)
        self.load_layers()

    def load_layers(self) -> None:
        """Load the companion ``layers.onnx`` of every model version that has one (blocking: run it
        in a thread). Also in a front end whose models run in a device executor: the layers of a
        request's few images are computed where the request is served. A companion that cannot be
        loaded is logged and left out (explanations then carry no layers); it never stops the server."""
        for spec in repository.scan(self.settings.model_repository):
            try:
                companion = LayerModel.beside(spec)
            except Exception as e:  # noqa: BLE001 - ORT raises many types
                log.warning("%s/%s: cannot load its layers.onnx, explanations will have no layers: %s",
                            spec.name, spec.version, e)  # fmt: skip
                continue
            if companion is not None:
                self.layer_models[(spec.name, spec.version)] = companion

    def _stats(self, index: int) -> tuple[ModelStats, np.ndarray | None]:
        if self.table is None:
            return ModelStats(max_batch_size=self.settings.max_batch_size), None
        return ModelStats(self.table.stats[self.row, index]), self.table.stats[:, index]

    def start(self) -> None:
        """Create the batchers on the running loop and report ready."""
        s = self.settings
        for index, runtime in enumerate(self._runtimes):
            stats, rows = self._stats(index)
            batcher = Batcher(
                runtime.run_batch,
                max_batch_size=s.max_batch_size,
                max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
                max_queue_size=s.max_queue_size,
                observer=StatsObserver(self.metrics, runtime.name, stats),
                name=f"{runtime.name}-{runtime.version}",
            )
            batcher.start()
            self.models.setdefault(runtime.name, {})[runtime.version] = LoadedModel(
                runtime, batcher, stats, stats_rows=rows
            )
            self.metrics.model_info.labels(runtime.name, runtime.version, runtime.provider, runtime.precision).set(1)
        self.ready = True
        self.metrics.ready.set(1)
        self.metrics.workers.set(1)

    def start_remote(self, clients: list[ExecutorClient]) -> None:
        """Serve the models of the device executors ``clients`` are connected to, and report ready."""
        s = self.settings
        for index, model in enumerate(clients[0].models):
            stats, rows = self._stats(index)
            batcher = RemoteBatcher(clients, index, model, s.max_batch_size, s.max_queue_delay_ms / 1000.0,
                                    clients[0].max_queue_size)  # fmt: skip
            self.models.setdefault(model.name, {})[model.version] = LoadedModel(model, batcher, stats, stats_rows=rows)
        self.ready = True
        self.metrics.workers.set(1)

    def begin_drain(self) -> None:
        """Readiness turns false; admitted and new requests are still served until stop()."""
        self.draining = True
        self.metrics.ready.set(0)

    @property
    def is_ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """None when ready for traffic, else why not ("loading models" / "draining" / "no device
        executor is ready"): the one answer every readiness endpoint gives. In a multi-process
        server a front end is ready when it is and a device executor is (another front end
        restarting does not count: README "Supervision"); a drain turns every front end's
        readiness false at once."""
        table = self.table
        if self.draining or (table is not None and table.draining):
            return "draining"
        if not self.ready:
            return "loading models"
        if table is not None and not table.executors_ready():
            return "no device executor is ready (starting or restarting)"
        return None

    async def drain(self, timeout: float) -> bool:
        results = await asyncio.gather(*(m.batcher.drain(timeout) for m in self.all_models()))
        return all(results)

    async def close(self) -> None:
        self.ready = False
        await asyncio.gather(*(m.batcher.close() for m in self.all_models()))
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    # ---- lookup -----------------------------------------------------------------------------
    def all_models(self) -> list[LoadedModel]:
        return [m for versions in self.models.values() for m in versions.values()]

    def model(self, name: str | None = None, version: str | None = None) -> LoadedModel:
        """The model to answer a request. No name: the only model (or the first by name); no
        version: the highest. Raises NotReady before warm-up, ModelNotFound for unknown ones."""
        if not self.ready:
            raise NotReady("models are still loading")
        if not name:
            name = next(iter(sorted(self.models)))
        versions = self.models.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model {name!r} (available: {', '.join(sorted(self.models))})")
        if not version:
            version = max(versions, key=int)
        found = versions.get(str(version))
        if found is None:
            raise ModelNotFound(
                f"model {name!r} has no version {version!r} (available: {', '.join(sorted(versions, key=int))})"
            )
        return found

    def deadline(self, timeout_s: float | None) -> float | None:
        """A monotonic deadline from a client's timeout, else from default_timeout_ms."""
        if timeout_s is None and self.settings.default_timeout_ms > 0:
            timeout_s = self.settings.default_timeout_ms / 1000.0
        return None if timeout_s is None else time.monotonic() + timeout_s

    # ---- validation and decoding ------------------------------------------------------------
    def check_top_k(self, top_k: int | None, num_classes: int = MAX_TOP_K) -> int:
        limit = min(MAX_TOP_K, num_classes)
        # The default is capped at the model's classes (a 4-class model answers 4, not an error).
        k = min(self.settings.default_top_k, limit) if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limit:
            raise InvalidParameter(f"top_k must be an integer from 1 to {limit}, got {top_k!r}")
        return k

    def check_image_count(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("the request holds no image")
        if n > self.settings.max_images_per_request:
            raise PayloadTooLarge(f"{n} images in one request; the limit is {self.settings.max_images_per_request}")

    def hold_bytes(self, n: int) -> None:
        """Count ``n`` request bytes held in memory against max_buffered_bytes; BufferFull (503 /
        UNAVAILABLE) if they do not fit. Give them back with release_bytes when the request ends."""
        limit = self.settings.max_buffered_bytes
        if self.buffered_bytes + n > limit:
            raise BufferFull(
                f"server busy: {self.buffered_bytes} request bytes already buffered (limit {limit}); retry shortly"
            )
        self.buffered_bytes += n

    def release_bytes(self, n: int) -> None:
        self.buffered_bytes -= n

    def admit(self, model: LoadedModel, n_images: int) -> None:
        """Refuse a request of ``n_images`` before any work is done for it: PayloadTooLarge if it
        could never fit in the model's queue, Overloaded (429 / RESOURCE_EXHAUSTED with a retry
        hint) if it does not fit now. The depth counts the images queued in the batcher plus those
        admitted and still being decoded, so that concurrent requests cannot all pass and then
        decode for nothing. Constant time."""
        batcher = model.batcher
        if n_images > batcher.max_queue_size:
            # It could never be admitted: a 429 would invite retries that cannot succeed.
            raise PayloadTooLarge(f"{n_images} images exceed the queue's capacity of {batcher.max_queue_size}")
        depth = batcher.queued_images + model.decoding
        if depth + n_images > batcher.max_queue_size:
            self.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(
                f"queue full ({depth} images waiting, limit {batcher.max_queue_size})",
                retry_after_s=batcher.retry_after_s(),
            )

    def _decode_all(
        self,
        images: list[ImageInput],
        size: codec.Size = codec.DEFAULT_SIZE,
        deadline: float | None = None,
        gone: threading.Event | None = None,
    ) -> np.ndarray:
        """Decode every image, within the request's pixel budget; between images, stop if the
        deadline passed or the caller went away (``gone``)."""
        s = self.settings
        max_pixels = s.max_image_pixels
        budget = codec.PixelBudget(s.max_request_pixels)
        out = np.empty((len(images), *size, 3), np.uint8)
        if gone is not None:
            log.debug("decoding %d images in the pool", len(images))
        for i, image in enumerate(images):
            if gone is not None and gone.is_set():
                log.debug("caller gone: stopped decoding after %d of %d images", i, len(images))
                raise _CallerGone
            if deadline is not None and time.monotonic() >= deadline:
                error = DeadlineExceeded(f"deadline passed while decoding (after {i} of {len(images)} images)")
                error.counted_by_batcher = False  # refused here, not by the batcher: the transport counts it
                raise error
            try:
                if isinstance(image, RawImage):
                    out[i] = codec.raw_to_image(image.data, image.height, image.width, max_pixels, size, budget)
                else:
                    out[i] = codec.decode_image(image, max_pixels, size, budget)
            except (InvalidInput, PayloadTooLarge) as e:
                if len(images) > 1:
                    e.message = f"image {i}: {e.message}"
                    e.args = (e.message,)
                raise
        return out

    async def decode(
        self, images: list[ImageInput], size: codec.Size = codec.DEFAULT_SIZE, deadline: float | None = None
    ) -> np.ndarray:
        """uint8 [n,H,W,3] pixels of every image at ``size`` (the model's input size). Small
        JPEG/PNG/raw images on the event loop, the rest in the decode pool; cancelling the awaiting
        task (caller gone) stops the decoding thread at the next image, and a job not yet started
        never starts."""
        self.check_image_count(len(images))
        if self._small(images):
            return self._decode_all(images, size, deadline)
        gone = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._decode_all, images, size, deadline, gone
            )
        except asyncio.CancelledError:
            gone.set()
            self.metrics.rejected.labels("cancelled").inc()
            raise

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the decode pool (bounded; not asyncio's shared default pool): for
        parsing large request bodies off the event loop. A job not yet started when the caller
        is cancelled never starts."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    @staticmethod
    def _small(images: list[ImageInput]) -> bool:
        total_bytes = total_pixels = 0
        for im in images:
            if isinstance(im, RawImage):
                total_bytes += len(im.data)
                total_pixels += im.height * im.width
                continue
            pixels = codec.peek_pixels(im)
            if pixels is None:
                return False
            total_bytes += len(im)
            total_pixels += pixels
        return total_bytes <= INLINE_DECODE_BYTES and total_pixels <= INLINE_DECODE_PIXELS

    # ---- inference --------------------------------------------------------------------------
    async def _submit(self, model: LoadedModel, batch: np.ndarray, deadline: float | None) -> BatchOutput:
        started = time.monotonic()
        ok = False
        try:
            result = await model.batcher.submit(batch, deadline)
            ok = True
            return result
        finally:
            model.stats.request_done(ok, time.monotonic() - started)

    async def classify(
        self,
        images: list[ImageInput],
        top_k: int | None = None,
        model: str | None = None,
        version: str | None = None,
        deadline: float | None = None,
    ) -> Classification:
        """Decode, batch, and return each image's top-k, in order."""
        target = self.model(model, version)
        k = self.check_top_k(top_k, target.runtime.num_classes)
        n = len(images)
        self.check_image_count(n)
        self.admit(target, n)
        target.decoding += n
        try:
            pixels = await self.decode(images, target.runtime.image_size, deadline)
        finally:
            target.decoding -= n
        out = await self._submit(target, pixels, deadline)
        if k == target.runtime.num_classes:
            return Classification(
                target.name, target.version, out.ranked_indices, out.ranked_probabilities, out.ranked_labels
            )
        return Classification(
            target.name,
            target.version,
            [r[:k] for r in out.ranked_indices],
            [r[:k] for r in out.ranked_probabilities],
            [r[:k] for r in out.ranked_labels],
        )

    async def run_images(self, target: LoadedModel, pixels: np.ndarray, deadline: float | None = None) -> BatchOutput:
        """Run decoded uint8 [n,H,W,3] images through the model's batcher (as classify does,
        without the top-k): how explanations submit their perturbed images."""
        return await self._submit(target, pixels, deadline)

    def layer_model(self, target: LoadedModel) -> LayerModel | None:
        return self.layer_models.get((target.name, target.version))

    async def explain(
        self,
        images: list[ImageInput],
        top_k: int | None = None,
        model: str | None = None,
        version: str | None = None,
        target: int | None = None,
        method: str | None = None,
        seed: int = 0,
        deadline: float | None = None,
    ) -> Explanations:
        """Each image's top-k, attribution of ``target`` (default: the top-1) and layers
        (``service.explain.explainer``): validated like classify, then admitted by the explanations' own limits."""
        # Its perturbed images wait behind requests' images in the batch queues (service.inference.priority).
        token = priority.background.set(True)
        try:
            return await self.explainer.explain(images, top_k, model, version, target, method, seed, deadline)
        finally:
            priority.background.reset(token)

    async def infer_tensor(self, target: LoadedModel, tensor: np.ndarray, deadline: float | None = None) -> BatchOutput:
        """Run a preprocessed float32 [n,3,32,32] tensor (Open Inference Protocol input)."""
        expected = tuple(target.runtime.input_shape[1:])
        if tensor.dtype != np.float32 or tensor.ndim != 4 or tensor.shape[1:] != expected:
            raise InvalidInput(
                f"input must be FP32 [-1,{','.join(map(str, expected))}], got {tensor.dtype} {list(tensor.shape)}"
            )
        self.check_image_count(len(tensor))
        self.admit(target, len(tensor))
        return await self._submit(target, tensor, deadline)
