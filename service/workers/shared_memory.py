"""What the processes of a multi-process server share, and how it is laid out.

Everything lives in one private run folder (on ``/dev/shm`` where it exists, so it is memory),
made and removed by the supervisor:

- ``control``: the :class:`ControlTable` — each process's state, the drain flag, the queue
  counters that let a front end refuse work without asking the executor, and every process's
  row of model statistics. Each cell has one writer, so nobody takes a lock.
- ``fe<i>-ex<j>-<pid>.slab``: a front end's :class:`Slabs` for one executor — the model inputs it
  hands over and the results the executor writes back, row by row ("slots"). Images and results
  never go through a pipe.
- ``executor-<j>.sock``: the executor's Unix socket (SOCK_SEQPACKET: message boundaries kept). Only
  small records cross it: which slot holds which request's image, and which slots are done.
- ``metrics/``: prometheus-client's multiprocess folder.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ---- records on the executor's socket -------------------------------------------------------------
#: Front end → executor, one per image: which model, which slot holds it, the request's deadline
#: (``time.monotonic()``, the same clock in every process on Linux; 0: none), the image's place
#: in its request (0 marks a request's first image, for per-request statistics) and its kind: a
#: request's image, or background work (an explanation's perturbed images) that the executor
#: queues and computes in a lane of its own, at a lower OS priority.
SUBMIT = np.dtype([("request", "<u4"), ("slot", "<u4"), ("deadline", "<f8"), ("model", "<u2"), ("index", "<u2"),
                   ("kind", "u1")])  # fmt: skip
KIND_REQUEST, KIND_BACKGROUND = 0, 1
#: Executor → front end, one per image: the slot is done (results written when status is OK).
DONE = np.dtype([("request", "<u4"), ("slot", "<u4"), ("status", "u1")])
STATUS_OK, STATUS_DEADLINE, STATUS_CANCELLED, STATUS_FAILED = 0, 1, 2, 3

MSG_MODELS = b"M"  # executor → front end, on connect: JSON {models loaded at start, slab row sizes}
MSG_HELLO = b"H"  # front end → executor: JSON {frontend, slab path, slots, holds (slots it serves)}
MSG_SUBMIT = b"S"  # front end → executor: SUBMIT records
MSG_DONE = b"D"  # executor → front end: DONE records
# Model control (service.workers.executor): versions loaded and released while serving.
MSG_LOAD = b"L"  # front end → executor: JSON {id, name, version, path, key[, slot]}: load into a slot
MSG_LOADED = b"l"  # executor → front end: JSON {id, slot, model} or {id, error}
MSG_RELEASE = b"R"  # front end → executor: JSON {slot}: this front end serves that slot no more
#: Slots (model versions at once) of a device executor under model control: the control table's
#: statistics and heartbeat columns are sized once, at start, for this many. A swap holds the old
#: and the new version of a model at once, so this serves up to half as many versions steadily.
MODEL_CONTROL_SLOTS = 64
#: Most records in one message: keeps a message (24 B a record) well under the socket buffer.
MAX_RECORDS_PER_MESSAGE = 2048
MAX_MESSAGE_BYTES = 1 + SUBMIT.itemsize * MAX_RECORDS_PER_MESSAGE + 65536

# ---- process states -----------------------------------------------------------------------------
#: HUNG: set by the supervisor when a process stopped beating, so readiness turns false at once
#: while it is being killed and replaced.
STARTING, LISTENING, READY, STOPPED, HUNG = 0, 1, 2, 3, 4

#: Heartbeat slots per process row: 0 is the process's main loop (a front end's event loop, an
#: executor's I/O thread); the others are compute threads (``ControlTable.compute_slot``).
LOOP = 0
#: Compute threads per model version in a device executor: requests, and background work
#: (explanations' perturbed images) at a lower OS priority (``service.workers.model_queue``).
LANES = 2


#: How the supervisor tells a child to stop (drain its admitted work, then exit). Children ignore
#: SIGTERM and SIGINT: a terminal's Ctrl-C and systemd's default stop signal reach every process
#: of the group at once, and only the supervisor may decide the order of a drain.
STOP_SIGNAL = signal.SIGUSR1


def become_child() -> None:
    """In a child process: ignore the group's SIGTERM/SIGINT, dump stacks on SIGABRT, and get
    STOP_SIGNAL if the supervisor dies (Linux), so no process outlives its server."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The supervisor aborts a hung process with SIGABRT: every thread's stack goes to the log first,
    # which is what one needs to find why it hung.
    import faulthandler

    faulthandler.enable(all_threads=True)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(STOP_SIGNAL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def make_run_dir() -> Path:
    """A private folder for one server's shared files; in memory where /dev/shm exists. Its
    ``owner`` file names the supervisor (pid and start time), so a later server can tell it was left behind
    (``service.workers.housekeeping.sweep_run_dirs``)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="cnnserve-", dir=base))
    (path / "metrics").mkdir()
    (path / "owner").write_text(f"{os.getpid()} {process_start_time(os.getpid())}")
    return path


def process_start_time(pid: int) -> int:
    """When ``pid`` started (clock ticks since boot; 0 if unknown): with the pid, it names one
    process even after the pid is reused (a container's supervisor is pid 1 in every life)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def executor_socket(run_dir: str | Path, index: int) -> str:
    return str(Path(run_dir) / f"executor-{index}.sock")


class NoSharedMemory(OSError):
    """No room for a shared file: said in words with the sizes, where a sparse file would have
    killed the process with SIGBUS at its first write past the end of the room."""

    def __str__(self) -> str:
        return str(self.strerror)


#: Exit status of a process that found no room in /dev/shm (EX_TEMPFAIL), so the supervisor can say why.
EXIT_NO_SHARED_MEMORY = 75


def _map(path: Path, size: int, create: bool) -> mmap.mmap:
    if create:
        with open(path, "wb") as f:
            try:  # reserve the pages now: ENOSPC here rather than SIGBUS later
                os.posix_fallocate(f.fileno(), 0, size)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.ENOMEM):
                    raise
                st = os.statvfs(path.parent)
                f.close()
                path.unlink(missing_ok=True)
                raise NoSharedMemory(e.errno, f"no room in {path.parent} for {path.name}: it needs "
                                     f"{size / 2**20:.1f} MiB, {st.f_bavail * st.f_frsize / 2**20:.1f} MiB "
                                     "are free; give the container a larger /dev/shm") from None  # fmt: skip
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), size)


class _Layout:
    """Carves named numpy arrays out of one mapped file, each 64-byte aligned."""

    def __init__(self) -> None:
        self.parts: list[tuple[str, np.dtype, tuple[int, ...], int]] = []
        self.size = 0

    def add(self, name: str, dtype: type | np.dtype, shape: tuple[int, ...]) -> None:
        dt = np.dtype(dtype)
        self.parts.append((name, dt, shape, self.size))
        self.size += -(-int(np.prod(shape, dtype=np.int64)) * dt.itemsize // 64) * 64

    def bind(self, target: object, buffer: mmap.mmap) -> None:
        for name, dt, shape, offset in self.parts:
            setattr(target, name, np.ndarray(shape, dt, buffer=buffer, offset=offset))


@dataclass(frozen=True)
class TableShape:
    """Sizes of a :class:`ControlTable`; rows are executors first, then front ends."""

    path: str
    executors: int
    frontends: int
    models: int
    stats_width: int

    @property
    def processes(self) -> int:
        return self.executors + self.frontends

    def frontend_row(self, index: int) -> int:
        return self.executors + index


class ControlTable:
    """The shared control table (see the module's docstring). Arrays:

    - ``flags[0]``: 1 once the server drains (every front end's readiness turns false at once).
    - ``state[row]``: STARTING / LISTENING / READY / STOPPED per process; ``pid[row]``.
    - ``submitted[f, e]`` (front end f writes) and ``taken[f, e]`` (executor e writes): images
      handed over and images taken into a batch or dropped. The executor's queue depth is
      ``(submitted - taken)[:, e].sum()``: any front end reads it without a round trip. Two front
      ends admitting at the same instant can overshoot the bound by one request each.
    - ``stats[row, model]``: that process's :class:`service.metrics.ModelStats` vector, per model
      version (under model control with a device executor: per slot of the executor).
    - ``beat[row, slot]``: ``time.monotonic()`` of each loop's last heartbeat (slot 0 the main
      loop, ``compute_slot(m, lane)`` model m's compute thread for that lane; 0: not beating yet),
      and ``busy[row, slot]``: the images of the batch that compute thread is running (0: idle).
      The supervisor reads both (``service.workers.policy.hung``).
    """

    def __init__(self, shape: TableShape, create: bool = False) -> None:
        self.shape = shape
        layout = _Layout()
        layout.add("flags", np.int64, (8,))
        layout.add("state", np.int64, (shape.processes,))
        layout.add("pid", np.int64, (shape.processes,))
        layout.add("submitted", np.int64, (shape.frontends, shape.executors))
        layout.add("taken", np.int64, (shape.frontends, shape.executors))
        layout.add("stats", np.int64, (shape.processes, shape.models, shape.stats_width))
        layout.add("beat", np.float64, (shape.processes, 1 + LANES * shape.models))
        layout.add("busy", np.int64, (shape.processes, 1 + LANES * shape.models))
        self._buffer = _map(Path(shape.path), layout.size, create)
        self.flags: np.ndarray
        self.state: np.ndarray
        self.pid: np.ndarray
        self.submitted: np.ndarray
        self.taken: np.ndarray
        self.stats: np.ndarray
        self.beat: np.ndarray
        self.busy: np.ndarray
        layout.bind(self, self._buffer)

    def compute_slot(self, model: int, lane: int = 0) -> int:
        """The beat/busy slot of model ``model``'s compute thread for ``lane`` (0: requests, 1:
        background work; a front end computing its own models beats lane 0)."""
        return 1 + lane * self.shape.models + model

    def batch_watch(self, row: int, model: int) -> Callable[[int, int], None]:
        """A local batcher's ``on_batch`` (``service.inference.batcher.Batcher``) for model ``model``
        of a front end computing its own models: a batch in flight beats once when handed over
        and records its images in ``busy``; done, the slot is cleared, so an idle batch thread is
        never judged. A batch that does not come back within the hang timeout is a hang."""

        def on_batch(lane: int, images: int) -> None:
            slot = self.compute_slot(model, lane)
            if images:
                self.busy[row, slot] = images
                self.beat[row, slot] = time.monotonic()
            else:
                self.beat[row, slot] = 0.0
                self.busy[row, slot] = 0

        return on_batch

    def heartbeat(self, row: int, slot: int = LOOP) -> None:
        self.beat[row, slot] = time.monotonic()

    @property
    def draining(self) -> bool:
        return bool(self.flags[0])

    def queue_depth(self, executor: int) -> int:
        return int((self.submitted[:, executor] - self.taken[:, executor]).sum())

    def all_ready(self) -> bool:
        return bool((self.state == READY).all())

    def frontend_serving(self, besides: int) -> bool:
        """Whether a front end other than row ``besides`` serves (is READY)."""
        frontends = self.state[self.shape.executors :]
        return bool((np.delete(frontends, besides - self.shape.executors) == READY).any())

    def frontends_loading(self) -> bool:
        """Whether a front end listens (so the kernel hands it connections) but cannot serve yet."""
        return bool((self.state[self.shape.executors :] == LISTENING).any())

    def executors_ready(self) -> bool:
        """A front end can serve when at least one device executor is READY (or there are none).
        The other front ends do not count: one restarting does not answer at all, so no probe or
        request reaches it, while the rest serve (README "Supervision")."""
        executors = self.state[: self.shape.executors]
        return not len(executors) or bool((executors == READY).any())

    def describe(self) -> dict[str, Any]:
        return asdict(self.shape)


class Slabs:
    """One front end's shared rows for one executor: ``inputs[slot]`` (the model input, float32,
    flattened), and per slot the results the executor writes back: ``logits``, ``probabilities``
    (class order), ``order`` (classes ranked, best first) and ``ranked`` (probabilities in that
    order); ``cancelled[slot]`` is set by the front end when the caller went away, so the executor
    drops the image before compute."""

    def __init__(self, path: str | Path, slots: int, input_size: int, classes: int, create: bool = False) -> None:
        self.path, self.slots, self.input_size, self.classes = str(path), slots, input_size, classes
        layout = self._layout(slots, input_size, classes)
        self._buffer = _map(Path(path), layout.size, create)
        self.inputs: np.ndarray
        self.logits: np.ndarray
        self.probabilities: np.ndarray
        self.ranked: np.ndarray
        self.order: np.ndarray
        self.cancelled: np.ndarray
        layout.bind(self, self._buffer)

    @staticmethod
    def _layout(slots: int, input_size: int, classes: int) -> _Layout:
        layout = _Layout()
        layout.add("inputs", np.float32, (slots, input_size))
        layout.add("logits", np.float32, (slots, classes))
        layout.add("probabilities", np.float32, (slots, classes))
        layout.add("ranked", np.float32, (slots, classes))
        layout.add("order", np.int16, (slots, classes))
        layout.add("cancelled", np.uint8, (slots,))
        return layout

    @classmethod
    def size(cls, slots: int, input_size: int, classes: int) -> int:
        """Bytes of one front end's slabs for one executor (what it needs in /dev/shm)."""
        return cls._layout(slots, input_size, classes).size

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "slots": self.slots, "input_size": self.input_size, "classes": self.classes}
