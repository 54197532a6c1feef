"""Decoding a request's images into the model's input size, on the event loop or in a bounded pool.

Small JPEGs, PNGs and raw images are decoded on the event loop (tens of microseconds: a thread
hand-off would cost more): their cost is bounded by their size in bytes and their header's pixel
count (PNG text chunks are capped in codec). Anything larger, or of another format, is decoded in
the pool's threads so that one big photo (or a small file that inflates to many pixels) cannot
stall every other request. The transports use the same pool (``offload``) to parse large bodies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from service import tracing
from service.errors import DeadlineExceeded, InvalidInput, PayloadTooLarge
from service.inference import codec
from service.inference.serving import ImageInput, RawImage
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("cnnserve.decode")
T = TypeVar("T")

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


def small(images: list[ImageInput]) -> bool:
    """Whether the images are cheap enough to decode on the event loop."""
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


class DecodePool:
    """The process's bounded pool for decoding images and parsing large bodies (not asyncio's
    shared default pool, whose size is not ours to bound)."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(decode_thread_count(settings), thread_name_prefix="decode")

    async def decode(
        self, images: list[ImageInput], size: codec.Size = codec.DEFAULT_SIZE, deadline: float | None = None
    ) -> np.ndarray:
        """uint8 [n,H,W,3] pixels of every image at ``size`` (the model's input size). Cancelling
        the awaiting task (caller gone) stops the decoding thread at the next image, and a job not
        yet started never starts."""
        began = time.monotonic() if tracing.ENABLED else 0.0
        if small(images):
            pixels = self._decode_all(images, size, deadline)
        else:
            gone = threading.Event()
            # Traced: in the request's context, so the pool's log lines carry its trace id.
            decode_all = tracing.in_context(self._decode_all) if tracing.ENABLED else self._decode_all
            try:
                pixels = await asyncio.get_running_loop().run_in_executor(
                    self._pool, decode_all, images, size, deadline, gone
                )
            except asyncio.CancelledError:
                gone.set()
                self._metrics.rejected.labels("cancelled").inc()
                raise
        if tracing.ENABLED:
            tracing.stage("decode", began, images=len(images))
        return pixels

    async def offload(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in the pool: for parsing large request bodies off the event loop. A job
        not yet started when the caller is cancelled never starts."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _decode_all(
        self,
        images: list[ImageInput],
        size: codec.Size = codec.DEFAULT_SIZE,
        deadline: float | None = None,
        gone: threading.Event | None = None,
    ) -> np.ndarray:
        """Decode every image, within the request's pixel budget; between images, stop if the
        deadline passed or the caller went away (``gone``)."""
        s = self._settings
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
