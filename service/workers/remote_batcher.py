"""A front end's side of the device executors (``service.workers.executor``).

:class:`ExecutorClient` keeps one connection to one executor (reconnecting when it restarts),
owns this front end's slabs for it, hands images over through them and resolves each request's
future when its slots come back. :class:`RemoteBatcher` gives ``service.inference.core`` the interface of
``service.inference.batcher.Batcher`` for one model version served by the executors.

Cost on the event loop per request: a normalisation into the slab (numpy over the request's
images), one 21-byte record appended to a message that carries every request of this loop
iteration, and on completion a few row reads. If the executor dies (or drops this front end
for not reading its answers), every request waiting on it fails at once with ``NotReady`` (503 /
UNAVAILABLE: retry) and the client reconnects; a request whose deadline passes first is answered
504 / DEADLINE_EXCEEDED by a timer, whatever the executor is doing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from service import tracing
from service.errors import Cancelled, DeadlineExceeded, InferenceFailed, NotReady, Overloaded
from service.inference.model_description import ModelDescription
from service.inference.priority import Priority
from service.inference.runtime import BatchOutput
from service.workers import shared_memory

log = logging.getLogger("cnnserve.frontend")

_ONE_RECORD = struct.Struct("<IIdHHB")  # shared_memory.SUBMIT, packed, for the common one-image request
assert _ONE_RECORD.size == shared_memory.SUBMIT.itemsize
_RECORDS_PER_MESSAGE_BYTES = shared_memory.MAX_RECORDS_PER_MESSAGE * shared_memory.SUBMIT.itemsize


class _Pending:
    __slots__ = ("future", "model", "remaining", "slabs", "slots", "status", "timer")

    def __init__(
        self, future: asyncio.Future[BatchOutput], slots: list[int], model: ModelDescription, slabs: shared_memory.Slabs
    ) -> None:
        self.future, self.slots, self.model, self.slabs = future, slots, model, slabs
        self.remaining = len(slots)
        self.status = shared_memory.STATUS_OK
        self.timer: asyncio.TimerHandle | None = None

    def expire(self) -> None:
        """The deadline passed with the images still in the executor: answer the caller now (504 /
        DEADLINE_EXCEEDED), whatever the executor is doing, and have it drop them if it has not
        taken them yet. The slots stay taken until the executor answers for them, or goes away."""
        if not self.future.done():
            self.future.set_exception(DeadlineExceeded("deadline passed while waiting for the device executor"))
            self.slabs.cancelled[self.slots] = 1

    def caller_left(self, future: asyncio.Future[BatchOutput]) -> None:
        if future.cancelled():  # dropped by the executor before compute; the slots stay ours until it says so
            self.slabs.cancelled[self.slots] = 1


class ExecutorClient:
    def __init__(
        self, table: shared_memory.ControlTable, frontend: int, executor: int, run_dir: str | Path, slots: int
    ) -> None:
        self.table, self.frontend, self.executor = table, frontend, executor
        self.path = shared_memory.executor_socket(run_dir, executor)
        self.run_dir, self.slots = Path(run_dir), slots
        self.models: list[ModelDescription] = []  # the versions the executor loaded at start, by slot
        #: Model control: the slots this front end serves (loaded with ``load``, until ``release``).
        self.held: set[int] = set()
        self._loads: dict[int, asyncio.Future[dict[str, Any]]] = {}  # load request id -> its answer
        self._next_load = 1
        self.max_queue_size = 0
        self.slabs: shared_memory.Slabs | None = None
        self.sock: socket.socket | None = None
        self.connected = asyncio.Event()
        self.on_change: Callable[[], None] | None = None  # called when the connection comes or goes
        self._pending: dict[int, _Pending] = {}
        self._free: list[int] = []
        self._outbox: list[bytes] = []
        self._traces: list[bytes] = []  # contexts of this iteration's sampled requests (service.tracing.hop)
        self._flush_scheduled = False
        self._next_id = 1
        self._incarnation = 0
        self._lost: asyncio.Future[None] | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- connection ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, serve, and reconnect whenever the executor goes away, until close()."""
        self._loop = asyncio.get_running_loop()
        was_connected = False
        while not self._closed:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.connect(self.path)  # a Unix socket connects at once, or fails at once
            except OSError:
                sock.close()
                await asyncio.sleep(0.05)
                continue
            sock.setblocking(False)
            self._lost = self._loop.create_future()
            self.sock = sock
            self._loop.add_reader(sock.fileno(), self._readable)
            await self._lost
            if self.connected.is_set():
                was_connected = True
            self._drop_connection()
            if was_connected and not self._closed:
                log.warning(
                    "connection to device executor %d lost: its requests failed (503 / UNAVAILABLE); reconnecting",
                    self.executor,
                )

    def _readable(self) -> None:
        sock = self.sock
        while sock is not None:
            try:
                data = sock.recv(shared_memory.MAX_MESSAGE_BYTES)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lose()
                return
            kind = data[:1]
            if kind == shared_memory.MSG_DONE:
                self._done(np.frombuffer(data, shared_memory.DONE, offset=1))
            elif kind == shared_memory.MSG_MODELS:
                self._hello(orjson.loads(data[1:]))
            elif kind == shared_memory.MSG_LOADED:
                answer = orjson.loads(data[1:])
                waiter = self._loads.pop(answer["id"], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)

    def _hello(self, doc: dict[str, Any]) -> None:
        self.models = [ModelDescription.from_dict(m) for m in doc["models"]]
        self.max_queue_size = doc["max_queue_size"]
        input_size, classes = doc["input_size"], doc["classes"]
        self._incarnation += 1
        old = self.slabs
        path = self.run_dir / f"fe{self.frontend}-ex{self.executor}-{os.getpid()}-{self._incarnation}.slab"
        try:
            self.slabs = shared_memory.Slabs(path, self.slots, input_size, classes, create=True)
        except shared_memory.NoSharedMemory as e:
            # Retrying in a loop cannot make room: exit, and let the supervisor back off (and halt
            # the server if it keeps failing), saying why.
            log.error("front end %d: %s", self.frontend, e)
            logging.shutdown()
            os._exit(shared_memory.EXIT_NO_SHARED_MEMORY)
        if old is not None:
            Path(old.path).unlink(missing_ok=True)
        self._free = list(range(self.slots))
        self.table.submitted[self.frontend, self.executor] = 0
        hello = {"frontend": self.frontend, **self.slabs.describe(), "holds": sorted(self.held)}
        try:
            assert self.sock is not None
            self.sock.send(shared_memory.MSG_HELLO + orjson.dumps(hello))
        except OSError:
            self._lose()
            return
        self.connected.set()
        if self.on_change:
            self.on_change()

    def _lose(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _drop_connection(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None and self._loop is not None:
            self._loop.remove_reader(sock.fileno())
            self._loop.remove_writer(sock.fileno())
            sock.close()
        self.connected.clear()
        error = NotReady(f"device executor {self.executor} stopped; retry")
        for pending in self._pending.values():
            if pending.timer is not None:
                pending.timer.cancel()
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        for waiter in self._loads.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._loads.clear()
        self._outbox.clear()
        self._traces.clear()
        self._free = list(range(self.slots))
        self.table.submitted[self.frontend, self.executor] = 0
        if self.on_change:
            self.on_change()

    async def close(self) -> None:
        self._closed = True
        self._lose()

    # ---- model control: versions loaded and released while serving ----------------------------
    async def load(self, request: dict[str, Any]) -> tuple[int, ModelDescription]:
        """Have the executor load a version (``{name, version, path, key[, slot]}``; a version
        another front end loaded with the same key is shared): its slot and description, once it is
        loaded, warmed up and checked. VersionRefused says why it could not be."""
        if self.sock is None or self._loop is None or not self.connected.is_set():
            raise NotReady(f"device executor {self.executor} is starting or restarting; retry")
        request_id = self._next_load
        self._next_load += 1
        answer = self._loop.create_future()
        self._loads[request_id] = answer
        try:
            self.sock.send(shared_memory.MSG_LOAD + orjson.dumps({**request, "id": request_id}))
        except OSError:
            self._loads.pop(request_id, None)
            self._lose()
            raise NotReady(f"device executor {self.executor} stopped; retry") from None
        doc = await answer
        if doc.get("error"):
            raise VersionRefused(doc["error"])
        self.held.add(doc["slot"])
        return doc["slot"], ModelDescription.from_dict(doc["model"])

    def release(self, slot: int) -> None:
        """This front end serves ``slot`` no more (the executor frees it once no front end does).
        Not connected: the next hello's ``holds`` says it."""
        self.held.discard(slot)
        if self.sock is not None and self.connected.is_set():
            try:
                self.sock.send(shared_memory.MSG_RELEASE + orjson.dumps({"slot": slot}))
            except OSError:
                self._lose()

    # ---- requests -----------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.table.queue_depth(self.executor)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def submit(
        self,
        model_index: int,
        model: ModelDescription,
        x: np.ndarray,
        deadline: float | None,
        priority: Priority = Priority.REQUEST,
    ) -> asyncio.Future[BatchOutput]:
        """Hand ``x`` (float32, the model's input, first axis = images) to the executor; the future
        resolves to a :class:`BatchOutput` of exactly these images."""
        if self.sock is None or self.slabs is None or not self.connected.is_set():
            raise NotReady(f"device executor {self.executor} is starting or restarting; retry")
        n = len(x)
        depth = self.depth
        if depth + n > self.max_queue_size or n > len(self._free):
            raise Overloaded(f"queue full ({depth} images waiting, limit {self.max_queue_size})")
        kind = shared_memory.KIND_BACKGROUND if priority == Priority.BACKGROUND else shared_memory.KIND_REQUEST
        slabs, free = self.slabs, self._free
        slots = free[-n:]
        del free[-n:]
        request = self._next_id
        self._next_id = request + 1 if request < 0xFFFFFFFF else 1
        if tracing.ENABLED and (context := tracing.hop_record(request)) is not None:
            self._traces.append(context)
        flat = x.reshape(n, -1)
        size = flat.shape[1]
        if n == 1:
            slot = slots[0]
            slabs.inputs[slot, :size] = flat[0]
            slabs.cancelled[slot] = 0
            self._outbox.append(_ONE_RECORD.pack(request, slot, deadline or 0.0, model_index, 0, kind))
        else:
            index = np.array(slots)
            slabs.inputs[index, :size] = flat
            slabs.cancelled[index] = 0
            records = np.empty(n, shared_memory.SUBMIT)
            records["request"] = request
            records["slot"] = index
            records["deadline"] = deadline or 0.0
            records["model"] = model_index
            records["index"] = np.arange(n)
            records["kind"] = kind
            self._outbox.append(records.tobytes())
        assert self._loop is not None
        future = self._loop.create_future()
        pending = _Pending(future, slots, model, slabs)
        future.add_done_callback(pending.caller_left)
        if deadline:
            # A timer, not a check when the answer comes: a stalled executor must not hold the caller.
            pending.timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), pending.expire)
        self._pending[request] = pending
        self.table.submitted[self.frontend, self.executor] += n
        if not self._flush_scheduled:
            # Every request of this loop iteration goes in one message.
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        sock = self.sock
        if sock is None or not self._outbox:
            return
        payload = b"".join(self._outbox)
        self._outbox.clear()
        sent = 0
        try:
            if self._traces:  # before the records they describe: the executor reads them first
                traces, self._traces = self._traces, []  # lost if the socket is full: spans unlinked, requests fine
                for i in range(0, len(traces), shared_memory.MAX_RECORDS_PER_MESSAGE):
                    sock.send(tracing.MSG_TRACE + b"".join(traces[i : i + shared_memory.MAX_RECORDS_PER_MESSAGE]))
            while sent < len(payload):
                part = payload[sent : sent + _RECORDS_PER_MESSAGE_BYTES]
                sock.send(shared_memory.MSG_SUBMIT + part)
                sent += len(part)
        except BlockingIOError:  # the executor is behind: send the rest when the socket drains
            self._outbox.append(payload[sent:])
            assert self._loop is not None
            self._loop.add_writer(sock.fileno(), self._writable)
        except OSError:
            self._lose()

    def _writable(self) -> None:
        if self.sock is not None and self._loop is not None:
            self._loop.remove_writer(self.sock.fileno())
        self._flush()

    def _done(self, records: np.ndarray) -> None:
        pending = self._pending
        for request, status in zip(records["request"].tolist(), records["status"].tolist()):
            entry = pending.get(request)
            if entry is None:
                continue
            entry.remaining -= 1
            if status:
                entry.status = status
            if entry.remaining == 0:
                del pending[request]
                self._finish(entry)

    def _finish(self, entry: _Pending) -> None:
        future = entry.future
        if entry.timer is not None:
            entry.timer.cancel()
        if not future.done():
            if entry.status == shared_memory.STATUS_OK:
                future.set_result(self._result(entry))
            elif entry.status == shared_memory.STATUS_DEADLINE:
                future.set_exception(DeadlineExceeded("deadline passed while queued"))
            elif entry.status == shared_memory.STATUS_CANCELLED:
                future.set_exception(Cancelled("the caller went away"))
            else:
                future.set_exception(InferenceFailed("inference failed in the device executor (its log has the cause)"))
        if entry.slabs is self.slabs:
            self._free.extend(entry.slots)

    @staticmethod
    def _result(entry: _Pending) -> BatchOutput:
        model, slabs, slots = entry.model, entry.slabs, entry.slots
        classes = model.num_classes
        rows: Any = slice(slots[0], slots[0] + 1) if len(slots) == 1 else np.array(slots)
        logits = slabs.logits[rows, :classes].copy()
        probabilities = slabs.probabilities[rows, :classes].copy()
        order = slabs.order[rows, :classes].astype(np.int64)
        ranked = slabs.ranked[rows, :classes]
        return BatchOutput(
            logits, probabilities, order, order.tolist(), ranked.tolist(), model.labels_array[order].tolist()
        )


class VersionRefused(Exception):
    """The device executor could not load a version (its reason, in one line)."""


class RemoteBatcher:
    """``Batcher``'s interface for one model version that runs in the device executors: images
    are normalised here (front-end work) and handed to the least-loaded connected executor.
    ``slots``: the version's slot in each executor (``clients``' order); ``held``: loaded while
    serving (model control), so ``close`` releases the slots."""

    def __init__(
        self,
        clients: list[ExecutorClient],
        slots: list[int],
        model: ModelDescription,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        held: bool = False,
    ) -> None:
        self.clients, self.slots, self.model, self.held = clients, slots, model, held
        self.in_flight = 0  # requests of this version handed over and not answered yet
        self.max_batch_size, self.max_queue_delay_s, self.max_queue_size = (
            max_batch_size,
            max_queue_delay_s,
            max_queue_size,
        )

    @property
    def queued_images(self) -> int:
        """The device queue's depth, from the shared counters (no round trip)."""
        return min(c.depth for c in self.clients)

    def retry_after_s(self) -> float:
        return 1.0

    async def submit(
        self, items: np.ndarray, deadline: float | None = None, priority: Priority = Priority.REQUEST
    ) -> BatchOutput:
        x = items if items.dtype == np.float32 else self.model.normalizer(items)
        clients = self.clients
        if len(clients) == 1:
            client, slot = clients[0], self.slots[0]
        else:
            at = min(range(len(clients)), key=lambda i: (not clients[i].connected.is_set(), clients[i].depth))
            client, slot = clients[at], self.slots[at]
        future = client.submit(slot, self.model, x, deadline, priority)
        self.in_flight += 1
        try:
            return await future
        finally:
            self.in_flight -= 1

    async def drain(self, timeout: float) -> bool:
        """Wait until every request of this version handed over has come back; False on timeout."""
        until = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() >= until:
                return False
            await asyncio.sleep(0.01)
        return True

    async def close(self) -> None:
        """A version loaded while serving: its executors may free it once no front end serves it.
        The connections themselves are closed by their owner (``service.server``)."""
        if self.held:
            for client, slot in zip(self.clients, self.slots):
                client.release(slot)
