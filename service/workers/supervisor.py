"""``cnnserve serve``: one process, or a supervisor of several.

With ``--workers 1`` (and ``--executor worker``) the server is one process (``service.server``).
Otherwise this process supervises:

- N **front ends** (``service.server`` with a ``FrontendRole``) share the HTTP and gRPC ports
  (SO_REUSEPORT: the kernel spreads connections) and do all per-request work: protocol,
  validation, decoding, normalisation, top-k, answer formatting;
- with ``--executor device``, one **device executor** per GPU (one for the CPU) owns the
  sessions and batch queues (``service.workers.executor``); with ``--executor worker`` each front end
  runs the models itself.

It reserves both ports before anything starts (so a restarted front end can bind them again),
restarts any process that dies (a dead executor's requests fail at once with 503 /
UNAVAILABLE; a dead front end loses only its own connections), and runs the drain for all of
them: on SIGTERM or Ctrl-C readiness turns false in every front end at once, they serve on for
``drain_seconds``, then close their listeners and finish what they admitted; then the executors
stop. A second Ctrl-C stops everything at once (exit status 130).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType

from service.settings import Settings
from service.workers import shared_memory

log = logging.getLogger("cnnserve")

#: --executor auto on a machine without a GPU. Measured on 2 cores (docs/benchmarks.md): see README.
CPU_AUTO_EXECUTOR = "worker"


def visible_gpus(settings: Settings) -> list[int]:
    """CUDA device ordinals this server may use: none unless CUDA is among the providers and can
    run here (``service.inference.devices.cuda_available``); CUDA_VISIBLE_DEVICES is honoured by the driver."""
    if "CUDAExecutionProvider" not in settings.providers:
        return []
    from service.inference.devices import cuda_available

    if not cuda_available()[0]:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return [0]  # the driver answers but nvidia-smi is absent: at least one device
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # nvidia-smi lists every GPU; CUDA numbers the visible ones from 0
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return list(range(max(1, count)))


def plan(settings: Settings) -> tuple[int, str, list[int]]:
    """(front ends, executor placement, GPU ordinals) for ``settings`` on this machine.

    auto: with a GPU, one device executor per GPU and a front end per remaining core (the GPU
    waits on Python otherwise); on the CPU alone, what measured best on 2 cores: see README."""
    gpus = visible_gpus(settings)
    placement: str = settings.executor
    if placement == "auto":
        placement = "device" if gpus else CPU_AUTO_EXECUTOR
    from service.inference.devices import usable_cores

    cores = usable_cores()
    if settings.workers != "auto":
        workers = int(settings.workers)
    elif placement == "device":
        workers = max(1, min(32, cores - max(1, len(gpus))))
    else:
        workers = max(1, min(32, cores))
    return workers, placement, gpus


class Supervisor:
    def __init__(
        self, settings: Settings, workers: int, placement: str, gpus: list[int], frontend_main: Callable[..., None]
    ) -> None:
        self.settings, self.workers, self.placement, self.gpus = settings, workers, placement, gpus
        self.frontend_main = frontend_main  # a front-end process's entry point (service.server.frontend_main)
        self.executors = max(1, len(gpus)) if placement == "device" else 0
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}  # table row -> process
        self.stop_requested = False
        self.interrupts = 0
        self.started = time.monotonic()

    # ---- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                log.warning("second Ctrl-C: stopping now")
                self._kill_all()
                shutil.rmtree(self.run_dir, ignore_errors=True)
                logging.shutdown()
                os._exit(130)
        self.stop_requested = True

    # ---- processes ----------------------------------------------------------------------------
    def _spawn(self, row: int) -> None:
        from service.workers import executor

        shape = self.table.describe()
        target: Callable[..., None]
        if row < self.executors:
            settings = self.child_settings
            if self.gpus:
                settings = settings.model_copy(update={"cuda_device_id": self.gpus[row]})
            specs = [(s.name, s.version, str(s.path.resolve())) for s in self.specs]
            args: tuple[object, ...] = (settings.model_dump_json(), shape, row, specs)
            target, name = executor.main, f"cnnserve-executor-{row}"
        else:
            index = row - self.executors
            args = (self.child_settings.model_dump_json(), shape, index, str(self.run_dir), self.executors)
            target, name = self.frontend_main, f"cnnserve-frontend-{index}"
        self.table.state[row] = shared_memory.STARTING
        process = self.context.Process(target=target, args=args, name=name)
        process.start()
        self.processes[row] = process
        log.info("started %s (pid %d)", self._describe(row), process.pid)

    def _plan_precision(self) -> None:
        """precision auto with several workers that each run their own session: the variant is
        checked and timed once, here, and every worker loads what this chose (and checks it again),
        so that all answer alike. One device executor decides for itself."""
        c = self.child_settings
        if c.precision != "auto" or self.placement != "worker" or self.workers < 2:
            return
        if "CUDAExecutionProvider" in c.providers:
            return  # auto considers no variant on CUDA (service/inference/runtime.py AUTO_PRECISION)
        import json

        from service.inference.runtime import PLAN_ENVIRONMENT, ModelRuntime

        plan = {}
        for spec in self.specs:
            try:
                plan[f"{spec.name}/{spec.version}"] = ModelRuntime(spec, c).choice.to_dict()
            except Exception:  # noqa: BLE001 - each worker loads it again and reports why it cannot
                continue
        os.environ[PLAN_ENVIRONMENT] = json.dumps(plan)

    def _intra_op_threads(self) -> int:
        """ONNX Runtime threads per session when left to auto: the cores are shared out, not
        claimed by every process. Models in each worker: the worker's share of the cores. A CPU
        executor: the cores the front ends leave. A GPU executor: one (the GPU computes)."""
        from service.inference.devices import usable_cores

        cores = usable_cores()
        if self.placement == "worker":
            return max(1, cores // self.workers)
        return 1 if self.gpus else max(1, cores - self.workers)

    def _placement_text(self) -> str:
        return f"{self.executors} device executor(s)" if self.executors else "the models in each front end"

    def _describe(self, row: int) -> str:
        return f"device executor {row}" if row < self.executors else f"front end {row - self.executors}"

    def _reap(self, ever_ready: set[int]) -> int | None:
        """Restart processes that died; an exit status when one failed before it was ever ready."""
        from prometheus_client import multiprocess

        for row, process in list(self.processes.items()):
            if process.is_alive():
                continue
            code = process.exitcode
            if process.pid is not None:
                multiprocess.mark_process_dead(process.pid, str(self.run_dir / "metrics"))
                # A dead front end's slabs: memory in /dev/shm until unlinked (an executor that
                # still maps one keeps it alive until it lets go).
                for slab in self.run_dir.glob(f"fe*-ex*-{process.pid}-*.slab"):
                    slab.unlink(missing_ok=True)
            if row not in ever_ready and code not in (None, -signal.SIGKILL, -signal.SIGTERM):
                return code or 1  # it said why (a model that cannot load, a taken port): not a crash loop
            if self.stop_requested and code == 0:
                continue  # stopped on its own while draining: nothing to restart
            log.warning("%s (pid %s) died with exit status %s: restarting it", self._describe(row), process.pid, code)
            self._spawn(row)
        return None

    def _kill_all(self) -> None:
        for process in self.processes.values():
            if process.is_alive():
                process.kill()

    def _stop(self, rows: list[int], timeout: float) -> None:
        for row in rows:
            process = self.processes[row]
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, shared_memory.STOP_SIGNAL)
        until = time.monotonic() + timeout
        for row in rows:
            process = self.processes[row]
            process.join(max(0.0, until - time.monotonic()))
            if process.is_alive():
                log.warning("%s did not stop in time: killing it", self._describe(row))
                process.kill()
                process.join()

    # ---- the whole life ---------------------------------------------------------------------------
    def run(self) -> int:
        from service.metrics import ModelStats
        from service.startup import StartupError, bind_listener, check_repository

        s = self.settings
        try:
            self.specs = check_repository(s)
            # Reserve both ports for the server's whole life: front ends bind them again (SO_REUSEPORT).
            reserved = [
                bind_listener(s.host, s.http_port, "HTTP", reuse_port=True),
                bind_listener(s.host, s.grpc_port, "gRPC", reuse_port=True),
            ]
        except StartupError as e:
            log.error("%s", e)
            return 1
        http_port, grpc_port = (sock.getsockname()[1] for sock in reserved)
        self.run_dir = shared_memory.make_run_dir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.run_dir / "metrics")
        # The supervisor runs the drain: front ends close as soon as they are told to.
        self.child_settings = s.model_copy(
            update={"http_port": http_port, "grpc_port": grpc_port, "drain_seconds": 0.0}
        )
        if s.intra_op_threads == 0:
            self.child_settings.intra_op_threads = self._intra_op_threads()
        # The server-wide caps on connections and buffered request bytes are shared out among the
        # front ends (the kernel spreads connections evenly enough), so the whole server stays
        # within what the settings promise, memory above all.
        self.child_settings.max_connections = max(1, -(-s.max_connections // self.workers))
        self.child_settings.max_buffered_bytes = max(1024, s.max_buffered_bytes // self.workers)
        # CUDA that cannot run here is said once, by the supervisor, not once per child.
        from service.inference.devices import usable_providers

        usable, reason = usable_providers(s.providers)
        if reason is not None and not s.require_gpu:
            log.warning("%s: running on the CPU", reason)
            self.child_settings.providers = usable or ["CPUExecutionProvider"]
        c = self.child_settings
        log.info(
            "each process: %d ONNX Runtime intra-op thread(s); each front end: up to %d connections and "
            "%d buffered request bytes",
            c.intra_op_threads,
            c.max_connections,
            c.max_buffered_bytes,
        )
        self._plan_precision()
        shape = shared_memory.TableShape(
            str(self.run_dir / "control"),
            self.executors,
            self.workers,
            len(self.specs),
            ModelStats.width(s.max_batch_size),
        )
        self.table = shared_memory.ControlTable(shape, create=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("starting %d front end(s) and %s", self.workers, self._placement_text())
        try:
            for row in range(shape.processes):
                self._spawn(row)
            return self._supervise(http_port, grpc_port)
        finally:
            self._kill_all()
            for sock in reserved:
                sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _supervise(self, http_port: int, grpc_port: int) -> int:
        s, table = self.settings, self.table
        frontends = list(range(self.executors, self.executors + self.workers))
        listening = ready = False
        ever_ready: set[int] = set()
        while not self.stop_requested:
            wait([p.sentinel for p in self.processes.values()], timeout=0.05)
            ever_ready.update(int(r) for r in (table.state == shared_memory.READY).nonzero()[0])
            failed = self._reap(ever_ready)
            if failed is not None:
                self._stop(list(self.processes), s.shutdown_timeout_seconds)
                return failed
            if not listening and all(
                table.state[r] in (shared_memory.LISTENING, shared_memory.READY) for r in frontends
            ):
                listening = True
                log.info("listening http=%s:%d grpc=%s:%d", s.host, http_port, s.host, grpc_port)
            if listening and not ready and table.all_ready():
                ready = True
                elapsed = time.monotonic() - self.started
                log.info("ready in %.2fs: %d front end(s), %s", elapsed, self.workers, self._placement_text())
        table.flags[0] = 1
        log.info(
            "draining: readiness is false everywhere, serving for %.1fs more (Ctrl-C again stops now)", s.drain_seconds
        )
        until = time.monotonic() + s.drain_seconds
        while time.monotonic() < until:
            wait([p.sentinel for p in self.processes.values()], timeout=min(0.05, max(0.0, until - time.monotonic())))
            self._reap(set(self.processes))
        log.info("closing listeners; finishing admitted requests (at most %.1fs)", s.shutdown_timeout_seconds)
        self._stop(frontends, s.shutdown_timeout_seconds + 5.0)
        self._stop(list(range(self.executors)), 10.0)
        log.info("stopped")
        return 0


def run(settings: Settings, serve: Callable[[Settings], int], frontend_main: Callable[..., None]) -> int:
    """``cnnserve serve``: one process (``serve``), or a supervisor of several whose front ends
    run ``frontend_main`` (see the module's docstring)."""
    from service import logs

    workers, placement, gpus = plan(settings)
    if workers == 1 and placement == "worker":
        return serve(settings)
    if settings.model_control_mode != "none" and placement != "worker":
        # Front ends that run the models swap together (service.model_control.fleet); the device
        # executor's sessions do not take new versions yet (README: Model control).
        logs.configure(settings.log_level, settings.log_format)
        log.error(
            "--model-control-mode %s with %d front end(s) and executor %s is not supported yet: use --executor worker",
            settings.model_control_mode,
            workers,
            placement,
        )
        return 1
    logs.configure(settings.log_level, settings.log_format)
    return Supervisor(settings, workers, placement, gpus, frontend_main).run()
