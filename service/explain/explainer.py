"""Explanations: a prediction, its attribution map and the layers' activations, for each image.

The attribution's perturbed images (``service.explain.attribution``) go through the core's
``run``, the model's queue and runtime, as background work (so they run wherever the model
runs, CPU or GPU). The layer activations of the one original image come from the companion
session (``service.explain.layers``) at the same time. Perturbing, attributing and the layers
run in threads at a lower OS priority, off the event loop that serves predictions.
``service.server`` builds the explainer over the core and hands it to the transports.

Explanations cost ~226 forward passes per image, so they have their own admission: at most
``explain_concurrency`` computed at once and ``explain_queue_size`` waiting for a turn; past that
a request is refused at once (``ExplanationsBusy``: HTTP 429 / RESOURCE_EXHAUSTED), before it
puts anything in the model's queue, so /predict traffic keeps the rest of that queue. Each
explanation submits one image's perturbations at a time (at most 256 images in the queue).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from service.errors import DeadlineExceeded, InvalidParameter, Overloaded, PayloadTooLarge
from service.explain import attribution, layers
from service.explain.layers import LayerModels
from service.inference.core import InferenceCore
from service.inference.priority import Priority, lower_thread_priority
from service.inference.serving import ImageInput, LoadedModel
from service.metrics import Metrics
from service.settings import Settings

#: Layer descriptions as ``service.explain.layers.describe`` makes them (JSON-like values, PNG bytes).
Layer = dict[str, Any]


class ExplanationsBusy(Overloaded):
    """Every explanation slot is taken and the explanations' queue is full."""

    reason = "explain_busy"
    counted_by_batcher = False


@dataclass(frozen=True)
class ImageExplanation:
    indices: list[int]
    probabilities: list[float]
    labels: list[str]
    method: str
    class_index: int
    label: str
    values: np.ndarray  # float32 [32,32]
    layers: list[Layer]


@dataclass(frozen=True)
class Explanations:
    model: str
    version: str
    results: list[ImageExplanation]


class Admission:
    """At most ``limit`` holders at once and ``queue`` waiting; ``slot()`` raises ExplanationsBusy
    at once past that."""

    def __init__(self, limit: int, queue: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.limit, self.queue = limit, queue
        self.active = self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None
        self._on_change = on_change or (lambda active, waiting: None)

    @asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit)
        if self._semaphore.locked() and self.waiting >= self.queue:
            raise ExplanationsBusy(
                f"explanations busy ({self.active} running, {self.waiting} waiting; limits "
                f"{self.limit} and {self.queue})",
                retry_after_s=1.0,
            )
        self.waiting += 1
        self._on_change(self.active, self.waiting)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._semaphore.acquire(), timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded("deadline passed while waiting for an explanation slot") from None
        finally:
            self.waiting -= 1
        self.active += 1
        self._on_change(self.active, self.waiting)
        try:
            yield
        finally:
            self.active -= 1
            self._semaphore.release()
            self._on_change(self.active, self.waiting)


class Explainer:
    def __init__(self, core: InferenceCore, layer_models: LayerModels, settings: Settings, metrics: Metrics) -> None:
        self.core = core
        self.layer_models = layer_models
        self.settings = settings
        self.metrics = metrics
        s = settings

        def gauges(active: int, waiting: int) -> None:
            metrics.explanations_active.set(active)
            metrics.explanations_waiting.set(waiting)

        self.admission = Admission(s.explain_concurrency, s.explain_queue_size, gauges)
        # Perturbing (~10 ms an image here), attributing, the layer activations and their PNGs are
        # CPU the explanation's client waits for, not a /predict caller: off the event loop, in
        # threads at a lower OS priority, like the perturbed images' batches. Two per explanation:
        # its layers run while its images are perturbed.
        self._cpu_pool = ThreadPoolExecutor(
            2 * s.explain_concurrency, thread_name_prefix="explain-cpu", initializer=lower_thread_priority
        )

    def check(self, model: LoadedModel, target: int | None, method: str | None, seed: int, count: int) -> str:
        """Validate the explanation's own parameters; the method to use."""
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidParameter(f"seed must be a non-negative integer, got {seed!r}")
        method = attribution.DEFAULT_METHOD if method is None or method == "" else method
        if method not in attribution.METHODS:
            raise InvalidParameter(f"method must be one of {', '.join(attribution.METHODS)}, got {method!r}")
        classes = model.runtime.num_classes
        valid = isinstance(target, int) and not isinstance(target, bool) and 0 <= target < classes
        if target is not None and not valid:
            raise InvalidParameter(f"target must be a class index from 0 to {classes - 1}, got {target!r}")
        limit = self.settings.explain_max_images
        if count > limit:
            raise PayloadTooLarge(f"{count} images in one explanation request; the limit is {limit}")
        return method

    async def explain(
        self,
        images: list[ImageInput],
        top_k: int | None = None,
        model: str | None = None,
        version: str | None = None,
        target: int | None = None,
        method: str | None = None,
        seed: int = attribution.DEFAULT_SEED,
        deadline: float | None = None,
    ) -> Explanations:
        """Each image's top-k, attribution of ``target`` (default: the top-1) and layers: validated
        like a classification, then admitted by the explanations' own limits."""
        core = self.core
        found = core.model(model, version)
        k = core.top_k(top_k, found.runtime.num_classes)
        method = self.check(found, target, method, seed, len(images))
        pixels = await core.decode(found, images)
        async with self.admission.slot(deadline):
            self.metrics.explanations.labels(method).inc()
            activations = asyncio.ensure_future(self._layers(found, pixels))
            try:
                results = []
                for i in range(len(pixels)):
                    results.append(await self._attribute(found, pixels[i], k, target, method, seed, deadline))
                drawn = await activations
            finally:
                activations.cancel()
        return Explanations(
            found.name,
            found.version,
            [replace(r, layers=drawn[i]) for i, r in enumerate(results)] if drawn else results,
        )

    async def _attribute(
        self,
        model: LoadedModel,
        image: np.ndarray,
        k: int,
        target: int | None,
        method: str,
        seed: int,
        deadline: float | None,
    ) -> ImageExplanation:
        """One image's top-k and attribution (its ``layers`` are filled in by the caller)."""
        fill = attribution.fill_colour(model.runtime.preprocessing)
        loop = asyncio.get_running_loop()
        batch, plan = await loop.run_in_executor(self._cpu_pool, attribution.perturb, image, fill, method, seed)
        # Perturbed images are background work in the model's queue (local or executor).
        out = await self.core.run(model, batch, deadline, Priority.BACKGROUND)
        chosen = out.ranked_indices[0][0] if target is None else target
        values = await loop.run_in_executor(self._cpu_pool, attribution.attribute, plan, out.probabilities, chosen)
        return ImageExplanation(
            out.ranked_indices[0][:k],
            out.ranked_probabilities[0][:k],
            out.ranked_labels[0][:k],
            method,
            chosen,
            model.runtime.labels[chosen],
            values,
            layers=[],
        )

    async def _layers(self, model: LoadedModel, pixels: np.ndarray) -> list[list[Layer]] | None:
        companion = self.layer_models.get(model.name, model.version)
        if companion is None:
            return None

        def work() -> list[list[Layer]]:
            activations = companion.run(model.runtime.normalizer(pixels))
            return [layers.describe(activations, i, companion.filter_pngs) for i in range(len(pixels))]

        return await asyncio.get_running_loop().run_in_executor(self._cpu_pool, work)
