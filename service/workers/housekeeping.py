"""What a multi-process server cleans up and checks around its processes: run folders left by
dead servers, metrics files of dead processes, room in /dev/shm, and the lock that keeps a second
server off ports this one serves.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from service.workers import shared_memory

if TYPE_CHECKING:
    from service.inference.repository import ModelSpec

log = logging.getLogger("cnnserve")

# ---- run folders of dead servers ------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _mapped_anywhere(path: Path) -> bool:
    """Whether any process we can see maps a file under ``path`` (a folder from before owner files
    were written: its processes map its control table while they live)."""
    needle = str(path) + "/"
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if needle in maps.read_text():
                return True
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return False


def left_behind(path: Path) -> bool:
    """A run folder whose server is gone: its ``owner`` (pid and start time) is no longer running,
    or (no owner file) nothing maps it."""
    try:
        pid, started = (int(v) for v in (path / "owner").read_text().split())
    except (OSError, ValueError):
        return not _mapped_anywhere(path)
    if pid == os.getpid():
        return True  # this process makes its folder after the sweep: the pid's previous life left it
    return not _alive(pid) or shared_memory.process_start_time(pid) != started


def sweep_run_dirs(base: str | Path = "/dev/shm") -> tuple[int, int]:
    """Remove run folders of servers that died without cleaning up (SIGKILL, an OOM kill: in
    Kubernetes a memory emptyDir outlives the container). Returns (folders, bytes) freed."""
    folders = freed = 0
    for path in Path(base).glob("cnnserve-*"):
        if not path.is_dir() or not left_behind(path):
            continue
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            folders, freed = folders + 1, freed + size
    return folders, freed


# ---- metrics of dead processes --------------------------------------------------------------------


def archive_metrics(metrics_dir: str | Path, pid: int) -> None:
    """Fold a dead process's counters and histograms into one ``<kind>_archive.db`` per kind and
    delete its files, so totals keep counting while the folder (and the time /metrics takes to read
    it) stays flat however often processes restart. Its live gauges go as prometheus-client's
    ``mark_process_dead`` says."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    folder = Path(metrics_dir)
    multiprocess.mark_process_dead(pid, str(folder))
    for kind in ("counter", "histogram", "summary"):
        dead = folder / f"{kind}_{pid}.db"
        if not dead.exists():
            continue
        archive = MmapedDict(str(folder / f"{kind}_archive.db"))
        try:
            for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(dead)):
                archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
        finally:
            archive.close()
        dead.unlink(missing_ok=True)


# ---- room in /dev/shm ---------------------------------------------------------------------------


def free_bytes(path: str | Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


#: Models larger than this are not read by the supervisor (memory it would hold for a moment for
#: a check): their slabs are sized when the executor loads them.
MAX_MODEL_BYTES_READ = 256 * 2**20


def model_sizes(paths: list[Path]) -> tuple[int, int] | None:
    """(largest input, most classes) over the models, in floats, read from their graphs without
    optimising them (milliseconds); None if a shape is not fixed or a model cannot be read."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    input_size = classes = 0
    for path in paths:
        if not Path(path).is_file() or Path(path).stat().st_size > MAX_MODEL_BYTES_READ:
            return None  # a pipe (it would block, and be read by the wrong process) or a large model
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - a model that cannot load is the executor's to report, in one line
            return None
        dims_in, dims_out = session.get_inputs()[0].shape[1:], session.get_outputs()[0].shape[1:]
        if not all(isinstance(d, int) for d in (*dims_in, *dims_out)):
            return None
        input_size = max(input_size, int(np.prod(dims_in)))
        classes = max(classes, int(np.prod(dims_out)))
    return input_size, classes


def shm_needed(frontends: int, executors: int, slots: int, input_size: int, classes: int) -> int:
    """Bytes the server's slabs take in /dev/shm: every front end has one set per executor, and a
    restarting front end's new set exists before its old one is unlinked (one set more)."""
    return (frontends * executors + executors) * shared_memory.Slabs.size(slots, input_size, classes)


def room_for_slabs(
    run_dir: Path, specs: list[ModelSpec], frontends: int, executors: int, slots: int
) -> tuple[int, str | None]:
    """(bytes the slabs need, why the server must not start or None): past the room in /dev/shm a
    process dies of SIGBUS on its first write, which says nothing of the cause."""
    if not executors:
        return 0, None
    sizes = model_sizes([spec.path for spec in specs])
    if sizes is None:
        return 0, None  # a model without fixed shapes: its slabs are sized when it loads
    needed = shm_needed(frontends, executors, slots, *sizes)
    free = free_bytes(run_dir)
    if free is None or free >= needed:
        return needed, None
    return needed, (f"not enough shared memory in {run_dir.parent}: {mib(free)} free, this server needs about "
                    f"{mib(needed)} ({frontends} front end(s) x {executors} executor(s), {slots} slots each); give "
                    "the container a larger /dev/shm or lower --workers / --max-queue-size")  # fmt: skip


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- one server per port --------------------------------------------------------------------------


def lock_port(port: int) -> socket.socket:
    """A lock held for the server's life so that a second server on the same port refuses to
    start (OSError when taken): with several processes every listener has SO_REUSEPORT, which lets
    another server with the same option bind the port and take half its connections. An abstract
    Unix socket named after the port: the kernel frees it when the process dies (no stale lock
    file), and it belongs to the network namespace, as ports do (two pods never collide)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0cnnserve-tcp-port-{port}")
    except OSError:
        sock.close()
        raise
    return sock
