"""Dynamic batching, framework-free: an asyncio queue of requests in front of one batch function.

- ``submit(items)`` queues a request of ``len(items)`` images and awaits its own slice of the
  results. A request larger than ``max_batch_size`` is split across consecutive batches.
- One worker task forms batches. With ``max_queue_delay_s == 0`` it is greedy: whenever the
  runtime is free it takes everything queued (up to the max), so a lone request never waits.
  With a delay it waits for a full batch or until the oldest request has waited that long.
- The batch function runs in a one-thread executor, so the event loop keeps accepting requests
  and the next batch forms while one computes.
- The queue is bounded in images: a submit that would overflow it raises ``Overloaded`` at once.
- A request whose deadline passed, or whose caller went away (its future was cancelled), is
  dropped before compute. A request is answered ``DeadlineExceeded`` at its deadline by a timer,
  wherever it is (queued behind a long batch, or in one that is stuck): the caller never waits
  past it, whatever the batch thread does.
- If the batch function raises, every request of that batch gets one ``InferenceFailed``.
- Background work (``service.inference.priority``: explanations) has a lane of its own: its own
  worker task and thread, at a lower OS priority, so a request never waits behind a background
  batch and the CPU goes to requests first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from service import tracing
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.inference.priority import BACKGROUND_NICE, Priority, lower_thread_priority

log = logging.getLogger("cnnserve.batcher")

# The batch function's outputs: a tuple of arrays (or a NamedTuple such as runtime.BatchOutput,
# whose fields may also be lists), each with one entry per image.
Outputs = TypeVar("Outputs", bound=Sequence[Any])
BatchFn = Callable[[list[np.ndarray]], Outputs]


class Observer(Protocol):
    """Hooks for metrics (``service.metrics.StatsObserver``), called on the event loop."""

    def queue_depth(self, images: int) -> None: ...
    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None: ...
    def dropped(self, reason: str, images: int) -> None: ...


class BatchObserver:
    """An :class:`Observer` whose hooks do nothing: the default, and a base for observers that
    want only some hooks."""

    def queue_depth(self, images: int) -> None: ...
    def batch_done(self, size: int, requests: int, queue_waits_s: list[float], compute_s: float) -> None: ...
    def dropped(self, reason: str, images: int) -> None: ...


@dataclass(eq=False)
class _Request(Generic[Outputs]):
    items: np.ndarray
    future: asyncio.Future[Outputs]
    deadline: float | None
    enqueued: float
    taken: int = 0  # images already given to a batch
    done: int = 0  # images whose results came back
    pieces: list[tuple[int, Outputs]] = field(default_factory=list)  # (start, outputs) per finished chunk
    span: Any = None  # the caller's span when tracing is on and it is sampled (service.tracing)


class Batcher(Generic[Outputs]):
    def __init__(
        self,
        run_batch: BatchFn[Outputs],
        *,
        max_batch_size: int = 64,
        max_queue_delay_s: float = 0.0,
        max_queue_size: int = 1024,
        observer: Observer | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_queue_delay_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.observer: Observer = observer or BatchObserver()
        self.name = name
        # Two lanes, indexed by Priority: requests, and background work (service.inference.priority:
        # explanations), each with its own worker task and thread, so /predict's latency holds
        # whatever /explain sends.
        self._queue: deque[_Request[Outputs]] = deque()
        self._background: deque[_Request[Outputs]] = deque()
        self._lanes = (self._queue, self._background)
        self._queued_images = 0
        self._lane_images = [0, 0]
        self._has_items = (asyncio.Event(), asyncio.Event())
        self._full = (asyncio.Event(), asyncio.Event())
        self._running = 0  # batches computing now
        self._idle = asyncio.Event()
        self._idle.set()
        self._executors = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-infer"),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-background",
                               initializer=lower_thread_priority, initargs=(BACKGROUND_NICE,)),
        )  # fmt: skip
        #: ``on_batch(lane, images)``, called on the loop when a batch is handed to the lane's
        #: thread (its images) and when it comes back (0): how the workers' supervisor watches a
        #: front end's batches for hangs (``ControlTable.batch_watch``), as it does an executor's.
        self.on_batch: Callable[[int, int], None] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self._mean_batch_s = 0.01  # running estimate, for Retry-After

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def retry_after_s(self) -> float:
        """When a refused request might fit: the time to drain the queue as it is now (at least 1 s)."""
        return max(1.0, (self._queued_images / self.max_batch_size + 1) * self._mean_batch_s)

    def start(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [loop.create_task(self._run(lane), name=f"{self.name}-worker-{lane}") for lane in (0, 1)]

    async def submit(
        self, items: np.ndarray, deadline: float | None = None, priority: Priority = Priority.REQUEST
    ) -> Outputs:
        """Queue ``items`` (first axis = images) and return the batch function's outputs for
        exactly these images. ``deadline`` is a ``time.monotonic()`` instant; background images
        (``Priority.BACKGROUND``) are batched in their own lane, computed at a lower OS priority."""
        if self._closed:
            raise NotReady(f"{self.name} is shut down")
        n = len(items)
        if n == 0:
            raise ValueError("empty request")
        if self._queued_images + n > self.max_queue_size:
            self.observer.dropped("queue_full", n)
            raise Overloaded(
                f"queue full ({self._queued_images} images waiting, limit {self.max_queue_size})",
                retry_after_s=self.retry_after_s(),
            )
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        request = _Request(items, future, deadline, time.monotonic())
        if tracing.ENABLED:
            request.span = tracing.current()
        lane = 1 if priority == Priority.BACKGROUND else 0
        self._lanes[lane].append(request)
        self._queued_images += n
        self._lane_images[lane] += n
        self._idle.clear()
        self._has_items[lane].set()
        if self._lane_images[lane] >= self.max_batch_size:
            self._full[lane].set()
        self.observer.queue_depth(self._queued_images)
        if deadline is None:
            return await request.future
        timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), _expire, request.future)
        try:
            return await request.future
        finally:
            timer.cancel()

    async def _wait_for_batch(self, lane: int) -> None:
        await self._has_items[lane].wait()
        if self.max_queue_delay_s <= 0 or self._lane_images[lane] >= self.max_batch_size:
            return
        # Remaining time of the oldest request's delay, not a fresh full delay.
        remaining = self._lanes[lane][0].enqueued + self.max_queue_delay_s - time.monotonic()
        if remaining > 0:
            try:
                await asyncio.wait_for(self._full[lane].wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _take_batch(self, lane: int) -> list[tuple[_Request[Outputs], int, int]]:
        """Chunks (request, start, end) for ``lane``'s next batch, dropping dead requests."""
        chunks: list[tuple[_Request[Outputs], int, int]] = []
        queue = self._lanes[lane]
        size, now = 0, time.monotonic()
        while queue and size < self.max_batch_size:
            request = queue[0]
            left = len(request.items) - request.taken
            expired = request.deadline is not None and request.deadline <= now
            if expired or request.future.done():
                queue.popleft()
                self._queued_images -= left
                self._lane_images[lane] -= left
                # A gRPC call past its deadline is cancelled by grpc itself: still a "deadline" drop.
                self.observer.dropped("deadline" if expired else "cancelled", left)
                if not request.future.done():
                    request.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            take = min(left, self.max_batch_size - size)
            chunks.append((request, request.taken, request.taken + take))
            request.taken += take
            size += take
            self._queued_images -= take
            self._lane_images[lane] -= take
            if request.taken == len(request.items):
                queue.popleft()
        if not queue:
            self._has_items[lane].clear()
        if self._lane_images[lane] < self.max_batch_size:
            self._full[lane].clear()
        self.observer.queue_depth(self._queued_images)
        return chunks

    def _check_idle(self) -> None:
        if not self._queue and not self._background and not self._running:
            self._idle.set()

    async def _run(self, lane: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wait_for_batch(lane)
            chunks = self._take_batch(lane)
            if not chunks:
                self._check_idle()
                continue
            parts = [r.items if (s == 0 and e == len(r.items)) else r.items[s:e] for r, s, e in chunks]
            started = time.monotonic()
            self._running += 1
            if self.on_batch is not None:
                self.on_batch(lane, sum(len(p) for p in parts))
            try:
                outputs = await loop.run_in_executor(self._executors[lane], self.run_batch, parts)
            except Exception as e:
                log.exception("%s: batch of %d images failed", self.name, sum(e_ - s for _, s, e_ in chunks))
                error = InferenceFailed(f"inference failed: {type(e).__name__}: {e}")
                for request, _, _ in chunks:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            finally:
                if self.on_batch is not None:
                    self.on_batch(lane, 0)
                self._running -= 1
                self._check_idle()
            elapsed = time.monotonic() - started
            self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * elapsed
            size = sum(e - s for _, s, e in chunks)
            self.observer.batch_done(size, len(chunks), [started - r.enqueued for r, s, _ in chunks if s == 0], elapsed)
            if tracing.ENABLED:
                tracing.batch_done(
                    self.name, [(r.span, r.enqueued, e - s) for r, s, e in chunks], started, elapsed, size
                )
            self._deliver(chunks, outputs)

    @staticmethod
    def _deliver(chunks: list[tuple[_Request[Any], int, int]], outputs: Sequence[Any]) -> None:
        offset = 0
        for request, start, end in chunks:
            n = end - start
            piece = tuple(out[offset : offset + n] for out in outputs)
            offset += n
            if request.future.done():
                continue
            request.pieces.append((start, piece))
            request.done += n
            if request.done == len(request.items):
                if len(request.pieces) == 1:
                    result = request.pieces[0][1]
                else:
                    request.pieces.sort(key=lambda p: p[0])
                    result = tuple(_concat([p[1][i] for p in request.pieces]) for i in range(len(outputs)))
                request.future.set_result(_retype(outputs, result))

    async def drain(self, timeout: float) -> bool:
        """Wait until everything admitted has been answered; False on timeout."""
        try:
            await asyncio.wait_for(self._wait_idle(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _wait_idle(self) -> None:
        while self._queue or self._background or not self._idle.is_set():
            await self._idle.wait()
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop the worker; requests still queued get NotReady."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass
        while self._queue or self._background:
            request = (self._queue or self._background).popleft()
            if not request.future.done():
                request.future.set_exception(NotReady("server shutting down"))
        self._queued_images = 0
        self._lane_images = [0, 0]
        for executor in self._executors:
            executor.shutdown(wait=True)


def _expire(future: asyncio.Future[Any]) -> None:
    """The deadline's timer: answer now. Still queued, the request is dropped (and counted) when
    a batch is next formed; in a batch, its results are thrown away."""
    if not future.done():
        future.set_exception(DeadlineExceeded("deadline passed while waiting for the model (queued or computing)"))


def _concat(pieces: list[Any]) -> Any:
    """Join one output's slices: arrays along axis 0, lists end to end."""
    if isinstance(pieces[0], np.ndarray):
        return np.concatenate(pieces)
    return [row for piece in pieces for row in piece]


def _retype(template: Any, values: tuple[Any, ...]) -> Any:
    """Rebuild a NamedTuple batch output from its sliced fields."""
    return type(template)._make(values) if hasattr(template, "_make") else values
