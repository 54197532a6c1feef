"""What the core serves, as the core sees it: a model version (:class:`ServedModel`) behind a
queue (:class:`BatchQueue`), and the records requests and answers are made of.

The two Protocols are the seams of the multi-process mode: in one process a model version is an
ONNX Runtime session (``service.inference.runtime.ModelRuntime``) behind a local
``service.inference.batcher.Batcher``; in a front end of a multi-process server it is the
description of a session that runs in a device executor
(``service.inference.model_description.ModelDescription``) behind
``service.workers.remote_batcher.RemoteBatcher``, which ``service.server`` hands to the core.
The core never names the workers' classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.inference.preprocess import Normalizer
from service.inference.priority import Priority
from service.inference.runtime import BatchOutput
from service.metrics import ModelStats


class ServedModel(Protocol):
    """What answering requests needs to know of a model version, wherever its session runs."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def labels(self) -> list[str]: ...
    @property
    def labels_array(self) -> np.ndarray: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def preprocessing(self) -> dict[str, Any]: ...
    @property
    def normalizer(self) -> Normalizer: ...
    @property
    def image_size(self) -> tuple[int, int]: ...
    @property
    def input_name(self) -> str: ...
    @property
    def input_shape(self) -> list[int]: ...
    @property
    def output_name(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def pad_to(self) -> int: ...
    @property
    def path(self) -> Path: ...


class BatchQueue(Protocol):
    """A model version's queue of images: ``submit`` a request's images, get back exactly their
    outputs. Bounded in images; ``queued_images`` and ``retry_after_s`` let the core refuse a
    request before any work is done for it. ``priority``: background images (an explanation's)
    wait behind requests' images (``service.inference.priority``)."""

    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_queue_delay_s(self) -> float: ...
    @property
    def max_queue_size(self) -> int: ...
    @property
    def queued_images(self) -> int: ...
    def retry_after_s(self) -> float: ...
    async def submit(
        self, items: np.ndarray, deadline: float | None = None, priority: Priority = Priority.REQUEST
    ) -> BatchOutput: ...
    async def drain(self, timeout: float) -> bool: ...
    async def close(self) -> None: ...


#: Makes the queue of model version ``index`` (its position in the served list) with its statistics.
QueueFactory = Callable[[int, ServedModel, ModelStats], BatchQueue]
#: This process's statistics of model version ``index`` and, in a multi-process server, every
#: process's rows of it (else None).
StatsSource = Callable[[int], tuple[ModelStats, np.ndarray | None]]
#: The ``Batcher.on_batch`` of model version ``index`` (named "name/version")'s local batcher:
#: how its batches in flight are watched for hangs (by the supervisor, or by /healthz).
BatchWatch = Callable[[int, str], Callable[[int, int], None]]


@dataclass
class LoadedModel:
    """A model version being served: ``runtime`` what it is, ``batcher`` its queue, ``stats`` this
    process's statistics, ``stats_rows`` every process's (multi-process server)."""

    runtime: ServedModel
    batcher: BatchQueue
    stats: ModelStats
    decoding: int = 0  # images admitted and being decoded: counted against the queue by admission
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
class RawImage:
    """Interleaved RGB uint8 pixels."""

    data: bytes
    height: int
    width: int


ImageInput = bytes | RawImage


@dataclass(frozen=True)
class Classification:
    """Top-k of every image of a request, in request order."""

    model: str
    version: str
    indices: list[list[int]]  # [n][k]
    probabilities: list[list[float]]  # [n][k]
    labels: list[list[str]]  # [n][k]
