"""The protocol-agnostic core: the served model versions and the few verbs every request uses.

Every transport (HTTP /predict, gRPC Classify, both Open Inference Protocol bindings through
``service.protocol``) and the explanations (``service.explain``) call these verbs and let
``service.errors`` exceptions through to their binding's mapping; none of them validates counts,
admits or batches on its own. A request makes one call for its inference: ``classify`` (encoded
or raw images) or ``infer`` (a preprocessed tensor), each with one count check and one admission.

The core does not know where a model version runs: ``start`` takes the versions to serve and a
factory of their queues (``service.inference.serving``); by default the sessions ``load`` made
here behind local batchers. Model control (``service.model_control``, composed over the core by
``service.server``) changes the served versions while serving through two hooks: ``local_model``
puts a session it loaded behind a local batcher, ``swap_versions`` serves a model's new set of
versions in one step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from service import tracing
from service.errors import InvalidInput, InvalidParameter, ModelNotFound, NotReady, Overloaded, PayloadTooLarge, shown
from service.inference import repository
from service.inference.batcher import Batcher
from service.inference.decoding import DecodePool
from service.inference.priority import Priority
from service.inference.runtime import BatchOutput, ModelRuntime, load_model
from service.inference.serving import (
    BatchQueue,
    BatchWatch,
    Classification,
    ImageInput,
    LoadedModel,
    QueueFactory,
    ServedModel,
    StatsSource,
)
from service.metrics import Metrics, ModelStats, StatsObserver, model_info_labels
from service.settings import Settings

log = logging.getLogger("cnnserve.core")

MAX_TOP_K = 10


class InferenceCore:
    """``stats``: where each model version's statistics live (in a multi-process server, this
    process's row of the shared table and every process's rows); by default this process's own.
    ``watch``: each local batcher's ``on_batch``, by model version: its batches in flight, watched
    for hangs by the supervisor (a front end) or by /healthz (one process); by default none."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        pool: DecodePool,
        stats: StatsSource | None = None,
        watch: BatchWatch | None = None,
    ) -> None:
        self._watch = watch
        self._settings = settings
        self._metrics = metrics
        self._pool = pool
        self._stats = stats or (lambda index: (ModelStats(max_batch_size=settings.max_batch_size), None))
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self._runtimes: list[ModelRuntime] = []
        self._started = False

    # ---- life cycle -------------------------------------------------------------------------
    def load(self) -> None:
        """Create and warm up a session per model version (blocking: run it in a thread)."""
        for spec in repository.scan(self._settings.model_repository):
            started = time.monotonic()
            runtime = load_model(spec, self._settings)
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

    def start(self, models: Sequence[ServedModel] | None = None, queue: QueueFactory | None = None) -> None:
        """Serve ``models`` behind the queues ``queue`` makes (on the running loop); by default the
        sessions ``load`` made, each behind a local batcher."""
        served: Sequence[ServedModel] = self._runtimes if models is None else models
        make_queue = queue or self._local_queue
        for index, model in enumerate(served):
            stats, rows = self._stats(index)
            loaded = LoadedModel(model, make_queue(index, model, stats), stats, stats_rows=rows)
            self._models.setdefault(model.name, {})[model.version] = loaded
            if models is None:
                self._metrics.model_info.labels(*model_info_labels(model)).set(1)
        self._started = True
        self._metrics.workers.set(1)

    def _local_queue(self, index: int, model: ServedModel, stats: ModelStats) -> BatchQueue:
        runtime = self._runtimes[index]
        batcher = self._batcher(runtime, stats)
        if self._watch is not None:
            batcher.on_batch = self._watch(index, f"{runtime.name}/{runtime.version}")
        return batcher

    def _batcher(self, runtime: ModelRuntime, stats: ModelStats) -> Batcher[BatchOutput]:
        """A started local batcher (on the running loop) around ``runtime``'s session."""
        s = self._settings
        batcher: Batcher[BatchOutput] = Batcher(
            runtime.run_batch,
            max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0,
            max_queue_size=s.max_queue_size,
            observer=StatsObserver(self._metrics, runtime.name, stats),
            name=f"{runtime.name}-{runtime.version}",
        )
        batcher.start()
        return batcher

    # ---- versions changed while serving (model control: service.model_control) -----------------
    def local_model(self, runtime: ModelRuntime) -> LoadedModel:
        """A model version loaded while serving, behind a started local batcher (on the running
        loop), not served until ``swap_versions``. Its statistics are this process's only: the
        columns of a multi-process server's shared table are sized at start."""
        stats = ModelStats(max_batch_size=self._settings.max_batch_size)
        loaded = LoadedModel(runtime, self._batcher(runtime, stats), stats)
        self._metrics.model_info.labels(*model_info_labels(runtime)).set(1)
        return loaded

    def versions(self, name: str) -> dict[str, LoadedModel]:
        """The served versions of model ``name`` by version (a copy; empty when it has none),
        without the readiness check of ``model``."""
        return dict(self._models.get(name, {}))

    def swap_versions(self, name: str, versions: dict[str, LoadedModel]) -> list[LoadedModel]:
        """Serve exactly ``versions`` of model ``name`` from now on (none: the model is gone), in one
        step: a lookup sees the old set or the new one, never a mix. Requests that already hold an
        old version finish on it; the versions no longer served are returned for the caller to
        drain and close."""
        old = self._models.get(name, {})
        if versions:
            self._models[name] = dict(versions)  # a new dict: nothing iterating the old one sees it change
        else:
            self._models.pop(name, None)
        return [m for v, m in old.items() if versions.get(v) is not m]

    async def drain(self, timeout: float) -> bool:
        """Wait for every queued request to finish; False if some were still queued at ``timeout``."""
        results = await asyncio.gather(*(m.batcher.drain(timeout) for m in self.models()))
        return all(results)

    async def close(self) -> None:
        self._started = False
        await asyncio.gather(*(m.batcher.close() for m in self.models()))
        self._pool.close()

    # ---- lookup -----------------------------------------------------------------------------
    def models(self, name: str | None = None) -> list[LoadedModel]:
        """Every served model version (no name; empty before start), or every version of one model
        in version order (ModelNotFound if it has none)."""
        if name is None:
            return [m for versions in self._models.values() for m in versions.values()]
        self.model(name)  # NotReady / ModelNotFound
        versions = self._models[name]
        return [versions[v] for v in sorted(versions, key=int)]

    def model(self, name: str | None = None, version: str | None = None) -> LoadedModel:
        """The model to answer a request. No name: the only model (or the first by name); no
        version: the highest. Raises NotReady before warm-up, ModelNotFound for unknown ones."""
        if not self._started:
            raise NotReady("models are still loading")
        if not name:
            if not self._models:  # model control: every model may be unloaded
                raise ModelNotFound("no model is loaded")
            name = min(self._models)
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(f"unknown model {shown(name)} (available: {', '.join(sorted(self._models))})")
        if not version:
            version = max(versions, key=int)
        found = versions.get(str(version))
        if found is None:
            raise ModelNotFound(
                f"model {name!r} has no version {shown(version)} (available: {', '.join(sorted(versions, key=int))})"
            )
        return found

    # ---- requests ---------------------------------------------------------------------------
    def deadline(self, timeout_s: float | None) -> float | None:
        """A monotonic deadline from a client's timeout, else from default_timeout_ms."""
        if timeout_s is None and self._settings.default_timeout_ms > 0:
            timeout_s = self._settings.default_timeout_ms / 1000.0
        return None if timeout_s is None else time.monotonic() + timeout_s

    def top_k(self, top_k: int | None, num_classes: int = MAX_TOP_K) -> int:
        """The number of classes to answer: ``top_k`` checked, or the default."""
        # The API's range is 1-MAX_TOP_K whatever the model; within it, the default and an explicit
        # top_k alike are capped at the model's classes (a 4-class model answers its 4 for top_k=8,
        # as Triton caps a classification's k), so a client need not know the model to ask.
        k = self._settings.default_top_k if top_k is None else top_k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
            raise InvalidParameter(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
        return min(k, num_classes)

    def precheck(self, name: str | None, version: str | None) -> None:
        """Refuse at once, before a transport reads the body, a request that could not be queued
        even with one image (queue full: Overloaded; not ready: NotReady). It admits nothing: the
        request's own admission comes with its inference. A model that is not found is left to
        the request, whose body may name another."""
        try:
            target = self.model(name, version)
        except ModelNotFound:
            return
        self._admit(target, 1)

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
        k = self.top_k(top_k, target.runtime.num_classes)
        n = len(images)
        self._check_count(n)
        self._admit(target, n)
        target.decoding += n
        try:
            pixels = await self._pool.decode(images, target.runtime.image_size, deadline)
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

    async def infer(
        self, target: LoadedModel, count: int, build: Callable[[], np.ndarray], deadline: float | None = None
    ) -> BatchOutput:
        """Run a request of ``count`` preprocessed images (Open Inference Protocol input): checked
        and admitted first, then ``build()`` makes its float32 [count,C,H,W] tensor (so a refused
        request never allocates one), then it goes through the model's queue."""
        self._check_count(count)
        self._admit(target, count)
        tensor = build()
        expected = tuple(target.runtime.input_shape[1:])
        if tensor.dtype != np.float32 or tensor.shape != (count, *expected):
            raise InvalidInput(
                f"input must be FP32 [-1,{','.join(map(str, expected))}], got {tensor.dtype} {list(tensor.shape)}"
            )
        return await self._submit(target, tensor, deadline)

    async def decode(self, target: LoadedModel, images: list[ImageInput]) -> np.ndarray:
        """uint8 [n,H,W,3] pixels of a request's images at ``target``'s input size, count-checked
        but not admitted: for explanations, which have their own admission and submit their images
        with ``run``."""
        self._check_count(len(images))
        return await self._pool.decode(images, target.runtime.image_size)

    async def run(
        self,
        target: LoadedModel,
        pixels: np.ndarray,
        deadline: float | None = None,
        priority: Priority = Priority.REQUEST,
    ) -> BatchOutput:
        """Run decoded uint8 [n,H,W,3] images through the model's queue as classify does, without
        the top-k or an admission of its own: how explanations submit their perturbed images, with
        ``Priority.BACKGROUND`` so they wait behind requests' images (``service.inference.priority``)."""
        return await self._submit(target, pixels, deadline, priority)

    # ---- checks -----------------------------------------------------------------------------
    def _check_count(self, n: int) -> None:
        if n == 0:
            raise InvalidInput("the request holds no image")
        if n > self._settings.max_images_per_request:
            raise PayloadTooLarge(f"{n} images in one request; the limit is {self._settings.max_images_per_request}")

    def _admit(self, model: LoadedModel, n_images: int) -> None:
        """Refuse a request of ``n_images`` before any work is done for it: PayloadTooLarge if it
        could never fit in the model's queue, Overloaded (429 / RESOURCE_EXHAUSTED with a retry
        hint) if it does not fit now. The depth counts the images queued plus those admitted and
        still being decoded, so that concurrent requests cannot all pass and then decode for
        nothing. Constant time."""
        batcher = model.batcher
        if n_images > batcher.max_queue_size:
            # It could never be admitted: a 429 would invite retries that cannot succeed.
            raise PayloadTooLarge(f"{n_images} images exceed the queue's capacity of {batcher.max_queue_size}")
        depth = batcher.queued_images + model.decoding
        if depth + n_images > batcher.max_queue_size:
            self._metrics.rejected.labels("queue_full").inc()
            raise Overloaded(
                f"queue full ({depth} images waiting, limit {batcher.max_queue_size})",
                retry_after_s=batcher.retry_after_s(),
            )
        if tracing.ENABLED:
            tracing.event("admitted", images=n_images, queued=depth)

    async def _submit(
        self,
        model: LoadedModel,
        batch: np.ndarray,
        deadline: float | None,
        priority: Priority = Priority.REQUEST,
    ) -> BatchOutput:
        started = time.monotonic()
        ok = False
        try:
            result = await model.batcher.submit(batch, deadline, priority)
            ok = True
            if tracing.ENABLED:
                r = model.runtime
                tracing.annotate(
                    model=r.name, version=r.version, precision=r.precision, provider=r.provider, images=len(batch)
                )
                tracing.event("computed")
            return result
        finally:
            model.stats.request_done(ok, time.monotonic() - started)
