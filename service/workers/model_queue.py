"""One model version's queue in the device executor (service.workers.executor), the thread that
batches and runs it, and the front-end connections its answers go to.

Two lanes, each with its own compute thread: requests, and background work (explanations'
perturbed images), whose thread runs at a lower OS priority
(``service.inference.priority.BACKGROUND_NICE``), so a request
never waits behind a background batch and the CPU goes to requests (and to the front ends that
serve them) first. Each compute thread takes a batch (greedy, or waiting ``max_queue_delay_ms`` for company), drops
images whose deadline passed or whose caller left, gathers the rest from the front ends' slabs
into one input, runs it, writes logits, probabilities and the ranking back into the same slots,
and answers each front end with one message per batch. Per-image work is numpy over whole chunks
of records; Python work is per message and per batch.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service import tracing
from service.inference.postprocess import ranking, softmax
from service.inference.priority import BACKGROUND_NICE, lower_thread_priority
from service.metrics import ModelStats, StatsObserver
from service.workers import shared_memory

if TYPE_CHECKING:
    from service.workers.executor import Executor

log = logging.getLogger("cnnserve.executor")


#: Most seconds a send to a front end may block: one that reads nothing for this long (stopped,
#: or its loop stuck) must not stall a device that serves every other front end.
SEND_TIMEOUT_S = 2.0


class DeviceModel(Protocol):
    """What the executor needs of a model version's session: ``service.inference.runtime.ModelRuntime``,
    or a stand-in (bench/executor_capacity.py measures the executor with a model that costs nothing)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def precision(self) -> str: ...
    @property
    def pad_to(self) -> int: ...
    @property
    def path(self) -> Path: ...
    @property
    def input_shape(self) -> list[int]: ...
    def run(self, x: np.ndarray) -> np.ndarray: ...
    def describe(self) -> dict[str, Any]: ...


class Frontend:
    """One connected front end: its socket, its slabs (after its hello) and whether it is alive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.index = -1
        self.slabs: shared_memory.Slabs | None = None
        self.alive = True
        self.send_lock = threading.Lock()
        self.traces: dict[int, Any] = {}  # request id → its context, for sampled requests only (service.tracing.hop)

    def send(self, payload: bytes) -> bool:
        """False when the front end is gone or was dropped now (so its answers were not sent)."""
        if not self.alive:
            return False
        try:
            with self.send_lock:
                self.sock.send(payload)
            return True
        except OSError as e:
            self.drop(f"{e.strerror or type(e).__name__}" if not isinstance(e, TimeoutError) else
                      f"it read nothing for {SEND_TIMEOUT_S:g}s")  # fmt: skip
            return False

    def drop(self, why: str) -> None:
        """Close the connection for good: the front end sees it end, fails what it has waiting here
        with 503 / UNAVAILABLE and reconnects, and its shared counters start afresh then. Dropping
        it silently would leave its requests unanswered and its queue count stuck."""
        if not self.alive:
            return
        self.alive = False
        log.warning("front end %d dropped: %s; its waiting requests fail (503 / UNAVAILABLE) and it reconnects",
                    self.index, why)  # fmt: skip
        try:  # shutdown, not close: the I/O thread still has the socket registered and closes it
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class Chunk:
    frontend: Frontend
    records: np.ndarray  # shared_memory.SUBMIT
    arrived: float


class ModelQueue:
    """One model version's queue of chunks of records, and the thread that batches and runs them."""

    def __init__(self, executor: Executor, index: int, runtime: DeviceModel, stats: ModelStats) -> None:
        s = executor.settings
        self.executor, self.index, self.runtime = executor, index, runtime
        self.max_batch_size = s.max_batch_size
        self.delay_s = s.max_queue_delay_ms / 1000.0
        # Two lanes: requests, and explanations' perturbed images (shared_memory.KIND_BACKGROUND),
        # each computed by its own thread, so /predict's latency holds whatever /explain sends.
        self.lanes: tuple[deque[Chunk], deque[Chunk]] = (deque(), deque())
        self.queued = [0, 0]  # images per lane
        self.closing = False  # retired (model control): finish what is queued, then the threads end
        self.cond = threading.Condition()
        self.observer = StatsObserver(executor.metrics, runtime.name, stats)
        self.stats_lock = threading.Lock()
        shape = tuple(runtime.input_shape[1:])
        self.input_shape, self.input_size = shape, int(np.prod(shape))
        name = f"{runtime.name}-{runtime.version}"
        self.threads = [
            threading.Thread(target=self._run, args=(lane,), name=f"{name}-{kind}", daemon=True)
            for lane, kind in enumerate(("batches", "background"))
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float | None) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def put(self, chunk: Chunk) -> None:
        kinds = chunk.records["kind"]
        with self.cond:
            if kinds[0] == kinds[-1] and (kinds == kinds[0]).all():
                lane = min(1, int(kinds[0]))
                self.lanes[lane].append(chunk)
                self.queued[lane] += len(chunk.records)
            else:  # a message can mix both kinds: each goes to its lane
                background = kinds != shared_memory.KIND_REQUEST
                self.lanes[0].append(Chunk(chunk.frontend, chunk.records[~background], chunk.arrived))
                self.lanes[1].append(Chunk(chunk.frontend, chunk.records[background], chunk.arrived))
                self.queued[1] += int(background.sum())
                self.queued[0] += len(chunk.records) - int(background.sum())
            self.cond.notify_all()  # the two lanes' threads wait on one condition

    def close(self) -> None:
        """Retire this version: its threads run what is queued, then end."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()

    def _take(self, lane: int = 0) -> list[Chunk] | None:
        """Up to max_batch_size records of ``lane``, FIFO; None once the executor stops and
        nothing is left."""
        beat = self.executor.table.heartbeat
        row, slot = self.executor.row, self.executor.table.compute_slot(self.index, lane)
        chunks, queued = self.lanes[lane], self.queued
        with self.cond:
            while not queued[lane]:
                beat(row, slot)
                if self.closing or self.executor.stopping.is_set():
                    return None
                self.cond.wait(0.1)
            if self.delay_s > 0 and queued[lane] < self.max_batch_size:
                # Remaining time of the oldest chunk's delay, not a fresh full delay.
                until = chunks[0].arrived + self.delay_s
                while queued[lane] < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    beat(row, slot)
                    self.cond.wait(min(left, 0.5))
            taken: list[Chunk] = []
            size = 0
            while chunks and size < self.max_batch_size:
                chunk = chunks[0]
                room = self.max_batch_size - size
                if len(chunk.records) <= room:
                    taken.append(chunks.popleft())
                    size += len(chunk.records)
                else:
                    taken.append(Chunk(chunk.frontend, chunk.records[:room], chunk.arrived))
                    chunk.records = chunk.records[room:]
                    size += room
            queued[lane] -= size
            depth = sum(queued)
        self.executor.metrics.queue_depth.labels(self.runtime.name).set(depth)
        return taken

    def _run(self, lane: int) -> None:
        table, row = self.executor.table, self.executor.row
        slot = table.compute_slot(self.index, lane)
        if lane:
            lower_thread_priority(BACKGROUND_NICE)
        while (chunks := self._take(lane)) is not None:
            answered: set[Frontend] = set()
            # The supervisor reads busy with the heartbeat: a batch past --hang-timeout-seconds is a hang.
            table.heartbeat(row, slot)
            table.busy[row, slot] = sum(len(c.records) for c in chunks)
            try:
                self._run_batch(chunks, answered)
            except Exception:  # noqa: BLE001 - whatever broke, every taken request gets an answer
                log.exception("%s/%s: a batch failed after it was taken; its requests are answered as failed",
                              self.runtime.name, self.runtime.version)  # fmt: skip
                self._fail(chunks, answered)
            finally:
                table.busy[row, slot] = 0

    def _fail(self, chunks: list[Chunk], answered: set[Frontend]) -> None:
        """Answer every record of ``chunks`` not yet answered with STATUS_FAILED (500 / INTERNAL at
        the caller), so no caller waits forever and the shared queue counter is not left high."""
        rest = [c for c in chunks if c.frontend not in answered]
        try:
            self._answer(rest, [np.full(len(c.records), shared_memory.STATUS_FAILED, np.uint8) for c in rest], answered)
        except Exception:  # noqa: BLE001 - cannot even answer: drop those front ends (they fail and reconnect)
            log.exception("answering a failed batch failed")
            for chunk in rest:
                chunk.frontend.drop("its answers could not be sent")

    def _run_batch(self, chunks: list[Chunk], answered: set[Frontend]) -> None:
        now = time.monotonic()
        live: list[tuple[Chunk, np.ndarray, np.ndarray]] = []  # (chunk, mask of its live records, statuses)
        statuses: list[np.ndarray] = []
        for chunk in chunks:
            rec, fe = chunk.records, chunk.frontend
            status = np.full(len(rec), shared_memory.STATUS_OK, np.uint8)
            if not fe.alive or fe.slabs is None:
                status[:] = shared_memory.STATUS_CANCELLED
            else:
                deadline = rec["deadline"]
                status[(deadline > 0) & (deadline <= now)] = shared_memory.STATUS_DEADLINE
                status[(status == shared_memory.STATUS_OK) & (fe.slabs.cancelled[rec["slot"]] != 0)] = (
                    shared_memory.STATUS_CANCELLED
                )
            statuses.append(status)
            if (status == shared_memory.STATUS_OK).any():
                live.append((chunk, status == shared_memory.STATUS_OK, status))
        for reason, code in (
            ("deadline", shared_memory.STATUS_DEADLINE),
            ("cancelled", shared_memory.STATUS_CANCELLED),
        ):
            # Per request, as the one-process batcher counts: a request's first image stands for it.
            dropped = sum(int(((s == code) & (c.records["index"] == 0)).sum()) for c, s in zip(chunks, statuses))
            if dropped:
                self.executor.metrics.rejected.labels(reason).inc(dropped)
        if live:
            self._compute(live)
        self._answer(chunks, statuses, answered)

    def _compute(self, live: list[tuple[Chunk, np.ndarray, np.ndarray]]) -> None:
        n = sum(int(mask.sum()) for _, mask, _ in live)
        x = np.empty((n, self.input_size), np.float32)
        pos, placed = 0, []
        for chunk, mask, _ in live:
            slabs = chunk.frontend.slabs
            assert slabs is not None  # live chunks come from front ends past their hello (_run_batch)
            slots = chunk.records["slot"][mask]
            x[pos : pos + len(slots)] = slabs.inputs[slots, : self.input_size]
            placed.append((slabs, slots, pos))
            pos += len(slots)
        started = time.monotonic()
        try:
            logits = self.runtime.run(x.reshape(n, *self.input_shape))
            probs = softmax(logits.copy())
            order = ranking(probs)
            ranked = np.take_along_axis(probs, order, axis=1)
        except Exception as e:
            log.exception("%s/%s: batch of %d images failed: %s", self.runtime.name, self.runtime.version, n, e)
            for _, mask, status in live:
                status[mask] = shared_memory.STATUS_FAILED
            return
        elapsed = time.monotonic() - started
        if tracing.ENABLED:
            tracing.executor_batch(self.runtime.name, self.runtime.version, live, started, elapsed, n)
        classes = logits.shape[1]
        for slabs, slots, start in placed:
            end = start + len(slots)
            slabs.logits[slots, :classes] = logits[start:end]
            slabs.probabilities[slots, :classes] = probs[start:end]
            slabs.ranked[slots, :classes] = ranked[start:end]
            slabs.order[slots, :classes] = order[start:end]
        firsts = [c.arrived for c, mask, _ in live for _ in range(int((c.records["index"][mask] == 0).sum()))]
        with self.stats_lock:  # both lanes' threads add to the same statistics row
            self.observer.batch_done(n, len(firsts), [started - a for a in firsts], elapsed)

    def _answer(self, chunks: list[Chunk], statuses: list[np.ndarray], answered: set[Frontend]) -> None:
        """One DONE message per front end; ``answered`` collects those served (a failure part-way
        must answer only the rest)."""
        by_frontend: dict[Frontend, list[np.ndarray]] = {}
        for chunk, status in zip(chunks, statuses):
            done = np.empty(len(chunk.records), shared_memory.DONE)
            done["request"] = chunk.records["request"]
            done["slot"] = chunk.records["slot"]
            done["status"] = status
            by_frontend.setdefault(chunk.frontend, []).append(done)
        for fe, parts in by_frontend.items():
            self.executor.count_taken(fe, sum(len(p) for p in parts))
            answered.add(fe)
            fe.send(shared_memory.MSG_DONE + b"".join(p.tobytes() for p in parts))
