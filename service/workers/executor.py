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

import gc
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    told to stop (``shared_memory.STOP_SIGNAL``), after which it finishes what is queued and returns.

    Each model version is a *slot*: a column of the control table (its statistics, its compute
    thread's heartbeat) and the index front ends put in their records. Without model control the
    versions found at start take slots 0..n-1 for good. With it (``--model-control-mode poll|explicit``)
    the front ends' controllers load versions while serving (``shared_memory.MSG_LOAD``): a version is
    loaded once however many front ends ask (its files' key), into a free slot beside the versions
    serving, and held by the front ends that asked; it is retired when the last one releases it
    (``MSG_RELEASE``): its thread runs what is queued, then its session is freed and the slot reused.
    The slots are written to the run folder, so an executor restarted by the supervisor loads the
    same versions into the same slots, which the front ends' records name."""

    def __init__(
        self, settings: Settings, table: shared_memory.ControlTable, index: int, specs: list[ModelSpec]
    ) -> None:
        self.settings, self.table, self.index, self.specs = settings, table, index, specs
        self.row = index
        self.metrics = Metrics()
        self.metrics.process_name = f"executor-{index}"
        self.stopping = threading.Event()
        self.queues: dict[int, ModelQueue] = {}  # slot -> its queue
        self._taken_lock = threading.Lock()
        self.model_control = settings.model_control_mode != "none"
        self.slots: dict[int, _Slot] = {}  # model control: what each slot holds and who serves it
        self._loads: dict[tuple[str, str, str], list[tuple[Frontend, int]]] = {}  # in progress -> who waits
        self._retiring: set[int] = set()  # slots whose thread still runs what was queued
        self._lock = threading.Lock()  # slots, loads and retiring: the I/O thread and load threads
        self.input_size = self.classes = 0  # the slabs' row geometry, fixed at start
        self._factory: Callable[[ModelSpec], DeviceModel] | None = None
        self._pinned: list[dict[str, Any]] = []  # descriptions of the versions loaded at start (slots 0..n-1)
        self._slots_file = Path(table.shape.path).parent / "model-control" / f"executor-{index}-slots.json"

    def load(self, runtime_factory: Callable[[ModelSpec], DeviceModel] | None = None) -> None:
        """Create and warm up every model version's session (``runtime_factory(spec)`` makes the
        runtime; by default an ONNX Runtime session on this executor's device). Under model control,
        the versions this executor's predecessor served (the slots file), if any."""
        from service.inference.runtime import load_model

        self._factory = runtime_factory or (lambda spec: load_model(spec, self.settings))
        descriptions = []
        for i, spec in enumerate(self.specs):
            runtime = self._open(spec)
            self._add_queue(i, runtime)
            descriptions.append(runtime.describe())
        if descriptions:
            self.input_size, self.classes = map(max, zip(*(_row_size(d) for d in descriptions)))
        if self.model_control:
            self._size_for_repository()
            self._reload_slots()
        self._pinned = descriptions

    def _open(self, spec: ModelSpec) -> DeviceModel:
        assert self._factory is not None
        started = time.monotonic()
        runtime = self._factory(spec)
        padded = f", batches padded to {runtime.pad_to}" if runtime.pad_to else ""
        log.info("loaded %s/%s from %s (%s) on %s in %.2fs%s", spec.name, spec.version, runtime.path,
                 runtime.precision, runtime.provider, time.monotonic() - started, padded)  # fmt: skip
        return runtime

    def _add_queue(self, slot: int, runtime: DeviceModel) -> ModelQueue:
        stats = ModelStats(self.table.stats[self.row, slot])
        queue = ModelQueue(self, slot, runtime, stats)
        self.queues[slot] = queue
        self.metrics.model_info.labels(*model_info_labels(runtime)).set(1)
        return queue

    def _size_for_repository(self) -> None:
        """The slabs' rows are sized once, for the largest input and most classes of the models in
        the repository at start (a version that needs more is refused, saying so)."""
        from service.workers.housekeeping import model_sizes

        input_size, classes = MODEL_CONTROL_MIN_ROW
        for path in sorted(Path(self.settings.model_repository).glob("*/*/model.onnx")):
            sizes = model_sizes([path])
            if sizes is not None:
                input_size, classes = max(input_size, sizes[0]), max(classes, sizes[1])
        self.input_size, self.classes = max(self.input_size, input_size), max(self.classes, classes)

    # ---- model control: versions loaded and released while serving --------------------------
    def _models_message(self) -> bytes:
        """What a front end is told on connecting: the versions loaded at start and the slabs' rows."""
        return shared_memory.MSG_MODELS + orjson.dumps({
            "executor": self.index, "max_queue_size": self.settings.max_queue_size, "models": self._pinned,
            "input_size": self.input_size, "classes": self.classes,
        })  # fmt: skip

    def _request_load(self, fe: Frontend, doc: dict[str, Any]) -> None:
        """A front end asks for a version: the slot that holds it already, the load in progress, or a new load."""
        if not self.model_control:
            fe.send(_loaded(doc["id"], error="model control is off (--model-control-mode none)"))
            return
        key = (str(doc["name"]), str(doc["version"]), str(doc["key"]))
        with self._lock:
            for slot, held in self.slots.items():
                if held.key == key and slot not in self._retiring:
                    held.holders.add(fe.index)
                    self._save_slots()
                    fe.send(_loaded(doc["id"], slot, self.queues[slot].runtime.describe()))
                    return
            waiting = self._loads.get(key)
            if waiting is not None:
                waiting.append((fe, doc["id"]))
                return
            self._loads[key] = [(fe, doc["id"])]
        spec = ModelSpec(key[0], key[1], Path(doc["path"]))
        wanted = doc.get("slot")
        threading.Thread(target=self._load_version, args=(key, spec, wanted), name=f"load-{key[0]}-{key[1]}",
                         daemon=True).start()  # fmt: skip

    def _load_version(self, key: tuple[str, str, str], spec: ModelSpec, wanted: int | None) -> None:
        """In its own thread: the same load, warm-up and precision check as at start, beside the
        versions serving; then a free slot, and every front end that asked meanwhile is answered."""
        slot, error, description = -1, "", {}
        try:
            runtime = self._open(spec)
            description = runtime.describe()
            need_in, need_classes = _row_size(description)
            if need_in > self.input_size or need_classes > self.classes:
                raise ValueError(f"it takes {need_in} input values and answers {need_classes} classes per image; "
                                 f"the device executor's shared rows hold {self.input_size} and {self.classes}, "
                                 "sized at start for the largest model then in the repository: restart the "
                                 "server to serve it")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - any failure is the answer, in one line
            error = (str(e).strip().splitlines() or [type(e).__name__])[0]
            log.error("%s/%s failed to load: %s", spec.name, spec.version, error)
        with self._lock:
            waiting = self._loads.pop(key)
            if not error:
                slot = self._free_slot(wanted)
                if slot < 0:
                    error = (f"slot {wanted} is in use" if wanted is not None else
                             f"all {self.table.shape.models} model slots of device executor {self.index} are in "
                             "use; unload versions first")  # fmt: skip
            if not error:
                # Nobody writes this column now (it was free): the new version's statistics start at 0.
                self.table.stats[:, slot] = 0
                self.slots[slot] = _Slot(key, str(spec.path), {fe.index for fe, _ in waiting if fe.alive})
                queue = self._add_queue(slot, runtime)
                queue.start()
                self._retire_unheld()  # every front end that asked went away meanwhile: nobody serves it
        for fe, request in waiting:
            fe.send(_loaded(request, slot, description) if not error else _loaded(request, error=error))

    def _free_slot(self, wanted: int | None) -> int:
        taken = set(self.queues) | self._retiring
        if wanted is not None:
            return wanted if 0 <= wanted < self.table.shape.models and wanted not in taken else -1
        return next((k for k in range(self.table.shape.models) if k not in taken), -1)

    def _release(self, fe: Frontend, slot: int) -> None:
        with self._lock:
            held = self.slots.get(slot)
            if held is not None:
                held.holders.discard(fe.index)
                self._retire_unheld()

    def _reconcile(self, fe: Frontend, holds: list[int]) -> None:
        """A front end (re)connected holding ``holds``: what it held before and no longer does
        (it restarted, or released while this executor was being replaced) is released now."""
        with self._lock:
            for slot, held in self.slots.items():
                if slot in holds:
                    held.holders.add(fe.index)
                else:
                    held.holders.discard(fe.index)
            self._retire_unheld()

    def _retire_unheld(self) -> None:
        """(Under the lock.) Retire the slots no front end serves any more."""
        for slot in [k for k, held in self.slots.items() if not held.holders]:
            del self.slots[slot]
            self._retiring.add(slot)
            queue = self.queues[slot]
            queue.close()
            threading.Thread(target=self._free, args=(slot, queue), name=f"free-{slot}", daemon=True).start()
        self._save_slots()

    def _free(self, slot: int, queue: ModelQueue) -> None:
        """Once the retired version's threads have run what was queued: its session is released and the slot reused."""
        queue.join(timeout=None)
        runtime = queue.runtime
        name, version = runtime.name, runtime.version
        # Zero, not removed: prometheus-client cannot remove a series in multiprocess mode.
        self.metrics.model_info.labels(*model_info_labels(runtime)).set(0)
        with self._lock:
            del self.queues[slot]
            for lane in range(shared_memory.LANES):  # not beating: not judged (policy.hung)
                self.table.beat[self.row, self.table.compute_slot(slot, lane)] = 0.0
            self._retiring.discard(slot)
        del queue, runtime
        gc.collect()
        log.info("model %s version %s closed in device executor %d; its session is released (slot %d free)",
                 name, version, self.index, slot)  # fmt: skip

    def _save_slots(self) -> None:
        """(Under the lock.) What each slot holds, for a successor (write, then rename)."""
        doc = {str(k): {"key": list(h.key), "path": h.path, "holders": sorted(h.holders)}
               for k, h in self.slots.items()}  # fmt: skip
        self._slots_file.parent.mkdir(exist_ok=True)
        staging = self._slots_file.with_suffix(".tmp")
        staging.write_bytes(orjson.dumps(doc))
        os.replace(staging, self._slots_file)

    def _reload_slots(self) -> None:
        """A restarted executor: the versions its predecessor served, into the same slots."""
        try:
            doc = orjson.loads(self._slots_file.read_bytes())
        except (OSError, ValueError):
            return
        for slot_text, held in doc.items():
            slot, key = int(slot_text), tuple(held["key"])
            try:
                runtime = self._open(ModelSpec(key[0], key[1], Path(held["path"])))
            except Exception as e:  # noqa: BLE001 - its requests are answered as failed; the others serve
                log.error("slot %d (%s/%s) cannot be loaded again: %s", slot, key[0], key[1], e)
                continue
            self.slots[slot] = _Slot((key[0], key[1], key[2]), held["path"], set(held["holders"]))
            self._add_queue(slot, runtime)
            # Its rows must fit, whatever the repository holds now.
            need_in, need_classes = _row_size(runtime.describe())
            self.input_size, self.classes = max(self.input_size, need_in), max(self.classes, need_classes)

    # ---- serving ------------------------------------------------------------------------------
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
        for queue in list(self.queues.values()):
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
            for queue in list(self.queues.values()):
                queue.join(timeout=self.settings.shutdown_timeout_seconds)
            self.table.state[self.row] = shared_memory.STOPPED

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        sock, _ = listener.accept()
        # Sends come from the compute threads: bounded, so one stuck front end cannot stall a device.
        sock.settimeout(SEND_TIMEOUT_S)
        fe = Frontend(sock)
        selector.register(sock, selectors.EVENT_READ, fe)
        fe.send(self._models_message())

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
            if self.model_control:
                self._reconcile(fe, hello.get("holds", []))
        elif kind == shared_memory.MSG_LOAD:
            self._request_load(fe, orjson.loads(data[1:]))
        elif kind == shared_memory.MSG_RELEASE:
            self._release(fe, int(orjson.loads(data[1:])["slot"]))
        elif kind == tracing.MSG_TRACE and tracing.ENABLED:
            tracing.hop_receive(fe.traces, data[1:])

    def _enqueue(self, fe: Frontend, model: int, records: np.ndarray, now: float) -> None:
        queue = self.queues.get(model)
        if queue is None or queue.closing:
            # A slot this executor could not load again after a restart, or one already retired:
            # answered as failed (500 / INTERNAL), never left waiting.
            log.error("records for model slot %d, which serves no version here, answered as failed", model)
            done = np.empty(len(records), shared_memory.DONE)
            done["request"], done["slot"] = records["request"], records["slot"]
            done["status"] = shared_memory.STATUS_FAILED
            self.count_taken(fe, len(records))
            fe.send(shared_memory.MSG_DONE + done.tobytes())
            return
        queue.put(Chunk(fe, records, now))


#: The smallest shared row under model control (a 3x32x32 image, 10 classes), so a server whose
#: repository starts empty can serve models of that size.
MODEL_CONTROL_MIN_ROW = (3 * 32 * 32, 10)


@dataclass
class _Slot:
    key: tuple[str, str, str]  # model, version, and the key of its files (the front ends' fingerprint)
    path: str
    holders: set[int]  # the front ends that serve it


def _row_size(description: dict[str, Any]) -> tuple[int, int]:
    """(input values, classes) per image of a described version: what its rows in the slabs hold."""
    return int(np.prod(description["input_shape"][1:])), len(description["labels"])


def _loaded(request: int, slot: int = -1, model: dict[str, Any] | None = None, error: str = "") -> bytes:
    doc: dict[str, Any] = {"id": request, "error": error} if error else {"id": request, "slot": slot, "model": model}
    return shared_memory.MSG_LOADED + orjson.dumps(doc)


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
