"""The device executor: the one process per device (each GPU; one for the CPU) that owns the ONNX
Runtime session of every model version and its one batch queue, fed by every front end.

So every front end's images meet in one queue per model version and batches are as large as the
node's whole load allows — not one small queue per front end, and not one CUDA context per
front end launching small batches.

Threads: one I/O thread accepts front ends and reads their records (a message carries many);
two compute threads per model version (requests; background work at a lower OS priority) each
take a batch (greedy, or waiting ``max_queue_delay_ms`` for company), drop images whose
deadline passed or whose caller left, gather the rest from the front ends' slabs into one
input, run it, write logits, probabilities and the ranking back into the same slots, and
answer each front end with one message per batch. Per-image work is numpy over whole chunks of
records; Python work is per message and per batch.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service import tracing
from service.inference.repository import ModelSpec
from service.metrics import Metrics, ModelStats, model_info_labels
from service.settings import Settings
from service.workers import shared_memory
from service.workers.model_queue import SEND_TIMEOUT_S, Chunk, DeviceModel, Frontend, ModelQueue

log = logging.getLogger("cnnserve.executor")


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

    def count_taken(self, fe: Frontend, n: int) -> None:
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
            queue.start()
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
                queue.join(timeout=self.settings.shutdown_timeout_seconds)
            self.table.state[self.row] = shared_memory.STOPPED

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        sock, _ = listener.accept()
        # Sends come from the compute threads: bounded, so one stuck front end cannot stall a device.
        sock.settimeout(SEND_TIMEOUT_S)
        fe = Frontend(sock)
        selector.register(sock, selectors.EVENT_READ, fe)
        fe.send(self._models_message)

    def _read(self, fe: Frontend, selector: selectors.BaseSelector) -> None:
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

    def _enqueue(self, fe: Frontend, model: int, records: np.ndarray, now: float) -> None:
        if model >= len(self.queues):  # a front end of another incarnation; cannot happen in one server
            log.error("record for unknown model index %d", model)
            return
        self.queues[model].put(Chunk(fe, records, now))


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
