"""The device executor: the one process per device (each GPU; one for the CPU) that owns the ONNX
Runtime session of every model version and its one batch queue, fed by every front end.

So every front end's images meet in one queue per model version and batches are as large as the
node's whole load allows — not one small queue per front end, and not one CUDA context per
front end launching small batches.

Threads: one I/O thread accepts front ends and reads their records (a message carries many);
one compute thread per model version takes a batch (greedy, or waiting ``max_queue_delay_ms``
for company), drops images whose deadline passed or whose caller left, gathers the rest from the
front ends' slabs into one input, runs it, writes logits, probabilities and the ranking back into
the same slots, and answers each front end with one message per batch. Per-image work is numpy
over whole chunks of records; Python work is per message and per batch.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from service import tracing
from service.inference.postprocess import ranking, softmax
from service.inference.repository import ModelSpec
from service.metrics import Metrics, ModelStats, StatsObserver, model_info_labels
from service.settings import Settings
from service.workers import shared_memory

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


class _Frontend:
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
class _Chunk:
    frontend: _Frontend
    records: np.ndarray  # shared_memory.SUBMIT
    arrived: float


class ModelQueue:
    """One model version's queue of chunks of records, and the thread that batches and runs them."""

    def __init__(self, executor: Executor, index: int, runtime: DeviceModel, stats: ModelStats) -> None:
        s = executor.settings
        self.executor, self.index, self.runtime = executor, index, runtime
        self.max_batch_size = s.max_batch_size
        self.delay_s = s.max_queue_delay_ms / 1000.0
        # Two lanes: requests first, explanations' perturbed images (shared_memory.KIND_BACKGROUND) in what
        # room a batch has left, so /predict's latency holds whatever /explain sends.
        self.lanes: tuple[deque[_Chunk], deque[_Chunk]] = (deque(), deque())
        self.queued = 0
        self.cond = threading.Condition()
        self.observer = StatsObserver(executor.metrics, runtime.name, stats)
        shape = tuple(runtime.input_shape[1:])
        self.input_shape, self.input_size = shape, int(np.prod(shape))
        self.thread = threading.Thread(target=self._run, name=f"{runtime.name}-{runtime.version}-batches", daemon=True)

    def put(self, chunk: _Chunk) -> None:
        kinds = chunk.records["kind"]
        with self.cond:
            if kinds[0] == kinds[-1] and (kinds == kinds[0]).all():
                self.lanes[min(1, int(kinds[0]))].append(chunk)
            else:  # a message can mix both kinds: each goes to its lane
                background = kinds != shared_memory.KIND_REQUEST
                self.lanes[0].append(_Chunk(chunk.frontend, chunk.records[~background], chunk.arrived))
                self.lanes[1].append(_Chunk(chunk.frontend, chunk.records[background], chunk.arrived))
            self.queued += len(chunk.records)
            self.cond.notify()

    def _take(self) -> list[_Chunk] | None:
        """Up to max_batch_size records, FIFO within each lane, requests first; None once the
        executor stops and nothing is left."""
        beat = self.executor.table.heartbeat
        row, slot = self.executor.row, 1 + self.index
        with self.cond:
            while not self.queued:
                beat(row, slot)
                if self.executor.stopping.is_set():
                    return None
                self.cond.wait(0.1)
            if self.delay_s > 0 and self.queued < self.max_batch_size:
                # Remaining time of the oldest chunk's delay, not a fresh full delay.
                until = min(lane[0].arrived for lane in self.lanes if lane) + self.delay_s
                while self.queued < self.max_batch_size and (left := until - time.monotonic()) > 0:
                    beat(row, slot)
                    self.cond.wait(min(left, 0.5))
            taken: list[_Chunk] = []
            size = 0
            for lane in self.lanes:
                while lane and size < self.max_batch_size:
                    chunk = lane[0]
                    room = self.max_batch_size - size
                    if len(chunk.records) <= room:
                        taken.append(lane.popleft())
                        size += len(chunk.records)
                    else:
                        taken.append(_Chunk(chunk.frontend, chunk.records[:room], chunk.arrived))
                        chunk.records = chunk.records[room:]
                        size += room
            self.queued -= size
        self.executor.metrics.queue_depth.labels(self.runtime.name).set(self.queued)
        return taken

    def _run(self) -> None:
        table, row, slot = self.executor.table, self.executor.row, 1 + self.index
        while (chunks := self._take()) is not None:
            answered: set[_Frontend] = set()
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

    def _fail(self, chunks: list[_Chunk], answered: set[_Frontend]) -> None:
        """Answer every record of ``chunks`` not yet answered with STATUS_FAILED (500 / INTERNAL at
        the caller), so no caller waits forever and the shared queue counter is not left high."""
        rest = [c for c in chunks if c.frontend not in answered]
        try:
            self._answer(rest, [np.full(len(c.records), shared_memory.STATUS_FAILED, np.uint8) for c in rest], answered)
        except Exception:  # noqa: BLE001 - cannot even answer: drop those front ends (they fail and reconnect)
            log.exception("answering a failed batch failed")
            for chunk in rest:
                chunk.frontend.drop("its answers could not be sent")

    def _run_batch(self, chunks: list[_Chunk], answered: set[_Frontend]) -> None:
        now = time.monotonic()
        live: list[tuple[_Chunk, np.ndarray, np.ndarray]] = []  # (chunk, mask of its live records, statuses)
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

    def _compute(self, live: list[tuple[_Chunk, np.ndarray, np.ndarray]]) -> None:
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
        self.observer.batch_done(n, len(firsts), [started - a for a in firsts], elapsed)

    def _answer(self, chunks: list[_Chunk], statuses: list[np.ndarray], answered: set[_Frontend]) -> None:
        """One DONE message per front end; ``answered`` collects those served (a failure part-way
        must answer only the rest)."""
        by_frontend: dict[_Frontend, list[np.ndarray]] = {}
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


class Executor:
    """Loads the models, then serves front ends on ``shared_memory.executor_socket(run_dir, index)`` until
    told to stop (``shared_memory.STOP_SIGNAL``), after which it finishes what is queued and returns."""

    def __init__(
        self, settings: Settings, table: shared_memory.ControlTable, index: int, specs: list[ModelSpec]
    ) -> None:
        self.settings, self.table, self.index, self.specs = settings, table, index, specs
        self.row = index
        self.metrics = Metrics()
        self.metrics.process_name = f"executor-{index}"
        self.stopping = threading.Event()
        self.queues: list[ModelQueue] = []
        self._taken_lock = threading.Lock()
        self._models_message = b""

    def load(self, runtime_factory: Callable[[ModelSpec], DeviceModel] | None = None) -> None:
        """Create and warm up every model version's session (``runtime_factory(spec)`` makes the
        runtime; by default an ONNX Runtime session on this executor's device)."""
        from service.inference.runtime import load_model

        factory: Callable[[ModelSpec], DeviceModel] = runtime_factory or (lambda spec: load_model(spec, self.settings))
        descriptions = []
        for i, spec in enumerate(self.specs):
            started = time.monotonic()
            runtime = factory(spec)
            padded = f", batches padded to {runtime.pad_to}" if runtime.pad_to else ""
            log.info(
                "loaded %s/%s from %s on %s in %.2fs%s",
                spec.name,
                spec.version,
                runtime.path,
                runtime.provider,
                time.monotonic() - started,
                padded,
            )
            stats = ModelStats(self.table.stats[self.row, i])
            self.queues.append(ModelQueue(self, i, runtime, stats))
            self.metrics.model_info.labels(*model_info_labels(runtime)).set(1)
            descriptions.append(runtime.describe())
        self._models_message = shared_memory.MSG_MODELS + orjson.dumps(
            {"executor": self.index, "max_queue_size": self.settings.max_queue_size, "models": descriptions}
        )

    def count_taken(self, fe: _Frontend, n: int) -> None:
        if fe.index >= 0 and fe.alive:
            with self._taken_lock:
                self.table.taken[fe.index, self.index] += n

    def serve(self, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(path)
        listener.listen(256)
        for queue in self.queues:
            queue.thread.start()
        self.table.pid[self.row] = os.getpid()
        self.table.state[self.row] = shared_memory.READY
        self.metrics.ready.set(1)
        log.info("executor %d ready on %s", self.index, path)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ, None)
        try:
            cpu_recorded = time.monotonic()
            while not self.stopping.is_set():
                self.table.heartbeat(self.row)
                if time.monotonic() - cpu_recorded >= 1.0:
                    self.metrics.record_process_cpu()
                    cpu_recorded = time.monotonic()
                for key, _ in selector.select(0.2):
                    if key.data is None:
                        self._accept(listener, selector)
                    else:
                        self._read(key.data, selector)
        finally:
            selector.close()
            listener.close()
            for queue in self.queues:
                queue.thread.join(timeout=self.settings.shutdown_timeout_seconds)
            self.table.state[self.row] = shared_memory.STOPPED

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        sock, _ = listener.accept()
        # Sends come from the compute threads: bounded, so one stuck front end cannot stall a device.
        sock.settimeout(SEND_TIMEOUT_S)
        fe = _Frontend(sock)
        selector.register(sock, selectors.EVENT_READ, fe)
        fe.send(self._models_message)

    def _read(self, fe: _Frontend, selector: selectors.BaseSelector) -> None:
        try:
            data = fe.sock.recv(shared_memory.MAX_MESSAGE_BYTES)
        except OSError:
            data = b""
        if not data:
            fe.alive = False
            selector.unregister(fe.sock)
            fe.sock.close()
            return
        kind = data[:1]
        if kind == shared_memory.MSG_SUBMIT:
            records = np.frombuffer(data, shared_memory.SUBMIT, offset=1)
            now = time.monotonic()
            models = records["model"]
            if (models == models[0]).all():
                self._enqueue(fe, int(models[0]), records, now)
            else:
                for m in np.unique(models):
                    self._enqueue(fe, int(m), records[models == m], now)
        elif kind == shared_memory.MSG_HELLO:
            hello = orjson.loads(data[1:])
            fe.slabs = shared_memory.Slabs(hello["path"], hello["slots"], hello["input_size"], hello["classes"])
            with self._taken_lock:
                self.table.taken[hello["frontend"], self.index] = 0
            fe.index = hello["frontend"]
        elif kind == tracing.MSG_TRACE and tracing.ENABLED:
            tracing.hop_receive(fe.traces, data[1:])

    def _enqueue(self, fe: _Frontend, model: int, records: np.ndarray, now: float) -> None:
        if model >= len(self.queues):  # a front end of another incarnation; cannot happen in one server
            log.error("record for unknown model index %d", model)
            return
        self.queues[model].put(_Chunk(fe, records, now))


def main(settings_json: str, table_shape: dict[str, Any], index: int, specs: list[tuple[str, str, str]]) -> None:
    """Entry point of an executor process (spawned by the supervisor)."""
    from service import logs

    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_level, settings.log_format)
    shared_memory.become_child()
    table = shared_memory.ControlTable(shared_memory.TableShape(**table_shape))
    executor = Executor(settings, table, index, [ModelSpec(n, v, Path(p)) for n, v, p in specs])
    signal.signal(shared_memory.STOP_SIGNAL, lambda *_: executor.stopping.set())
    tracing.start(settings, f"executor-{index}", executor.metrics.registry)
    try:
        executor.load()
    except Exception as e:  # noqa: BLE001 - one line naming the cause, then exit 1
        log.error("executor %d cannot load models: %s", index, e)
        raise SystemExit(1) from None
    executor.serve(shared_memory.executor_socket(Path(table_shape["path"]).parent, index))
