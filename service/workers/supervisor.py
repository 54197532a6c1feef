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
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from types import FrameType

from service.settings import Settings
from service.workers import housekeeping, policy, shared_memory
from service.workers.placement import plan

log = logging.getLogger("cnnserve")

#: Seconds between SIGABRT (stacks to the log) and SIGKILL for a hung process.
ABORT_GRACE_S = 1.0


class Supervisor:
    def __init__(
        self, settings: Settings, workers: int, placement: str, gpus: list[int], frontend_main: Callable[..., None]
    ) -> None:
        self.settings, self.workers, self.placement, self.gpus = settings, workers, placement, gpus
        self.frontend_main = frontend_main  # a front-end process's entry point (service.server.frontend_main)
        self.executors = max(1, len(gpus)) if placement == "device" else 0
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}  # table row -> process
        self.spawned_at: dict[int, float] = {}  # row -> when its current process started
        self.reaped: set[int] = set()  # rows whose dead process was dealt with (restart pending or none)
        self.restart_at: dict[int, float] = {}  # row -> when to start it again (backoff)
        self.aborted_at: dict[int, float] = {}  # row -> when it was sent SIGABRT for a hang
        self.ever_ready: set[int] = set()  # rows of which some incarnation was ready
        self.ready_now: set[int] = set()  # rows whose current incarnation reached READY
        self.policy = policy.RestartPolicy(settings.boot_failure_limit)
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
        self.table.beat[row] = 0.0
        self.table.busy[row] = 0
        process = self.context.Process(target=target, args=args, name=name)
        process.start()
        self.processes[row] = process
        self.spawned_at[row] = time.monotonic()
        self.ready_now.discard(row)
        self.reaped.discard(row)
        self.restart_at.pop(row, None)
        self.aborted_at.pop(row, None)
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

    def _model_columns(self) -> int:
        """The control table's columns per process for model versions: the versions found at start,
        or, when a device executor loads versions while serving, its slots (sized once, here)."""
        if self.executors and self.settings.model_control_mode != "none":
            return shared_memory.MODEL_CONTROL_SLOTS
        return len(self.specs)

    def _slot_names(self, row: int) -> list[str]:
        if self.executors and self.settings.model_control_mode != "none":  # slots hold what the front ends loaded
            models = [f"model slot {k}" for k in range(self._model_columns())]
        else:
            models = [f"{spec.name}/{spec.version}" for spec in self.specs]
        return policy.loop_names(row < self.executors, models)

    def _reap(self, halt_on_failure: bool = True) -> int | None:
        """Deal with processes that died: restart each (at once or after a backoff, as
        ``policy.RestartPolicy`` says), or return an exit status to stop the server with."""
        now = time.monotonic()
        for row, process in list(self.processes.items()):
            if row in self.reaped or process.is_alive():
                continue
            self.reaped.add(row)
            self.table.state[row] = shared_memory.STOPPED  # until its replacement starts
            code = process.exitcode
            if process.pid is not None:
                try:
                    housekeeping.archive_metrics(self.run_dir / "metrics", process.pid)
                except Exception:  # noqa: BLE001 - its metrics are not worth the supervisor's life
                    log.exception("could not archive the metrics of pid %d", process.pid)
                # A dead front end's slabs: memory in /dev/shm until unlinked (an executor that
                # still maps one keeps it alive until it lets go).
                for slab in self.run_dir.glob(f"fe*-ex*-{process.pid}-*.slab"):
                    slab.unlink(missing_ok=True)
            if self.stop_requested and code == 0:
                continue  # stopped on its own while draining: nothing to restart
            how = policy.describe_exit(code, housekeeping.free_bytes(self.run_dir))
            if code is not None and -code == signal.SIGBUS:
                how += f" (this server needs about {housekeeping.mib(self.shm_needed)} there)"
            was_ready = row in self.ready_now
            decision = self.policy.died(row, self._describe(row), code, now - self.spawned_at[row], was_ready,
                                        first_incarnation=row not in self.ever_ready)  # fmt: skip
            if decision.halt is not None and halt_on_failure:
                # At start-up the child's own line said why (one line for a corrupt model); later,
                # the cause of a stop is ours to say.
                say = log.error if row in self.ever_ready else log.info
                say("%s (pid %s) died: %s; stopping the server: %s", self._describe(row), process.pid, how,
                    decision.halt)  # fmt: skip
                return code if code is not None and code > 0 else 1
            if decision.delay > 0:
                log.warning("%s (pid %s) died: %s; restarting it in %.1fs", self._describe(row), process.pid, how,
                            decision.delay)  # fmt: skip
                self.restart_at[row] = now + decision.delay
            else:
                log.warning("%s (pid %s) died: %s; restarting it", self._describe(row), process.pid, how)
                self._spawn(row)
        for row, when in list(self.restart_at.items()):
            if when <= now and not self.stop_requested:
                self._spawn(row)
        return None

    def _watch_hangs(self) -> None:
        """Abort a process whose loops stopped beating (``policy.hung``): SIGABRT first, so its
        stacks reach the log, then SIGKILL if it is still there after ABORT_GRACE_S (a process
        stuck in the kernel cannot run its handler); its death then goes through ``_reap`` like
        any other."""
        now = time.monotonic()
        table, timeout = self.table, self.settings.hang_timeout_seconds
        for row, process in self.processes.items():
            if row in self.reaped or process.pid is None:
                continue
            if row in self.aborted_at:
                if now - self.aborted_at[row] >= ABORT_GRACE_S and process.is_alive():
                    process.kill()
                continue
            why = policy.hung(now, int(table.state[row]), table.beat[row], table.busy[row], timeout,
                              self._slot_names(row))  # fmt: skip
            if why is None:
                continue
            # Readiness turns false at once where this process was what made it true.
            table.state[row] = shared_memory.HUNG
            log.error("%s (pid %d) is hung: %s; aborting it (SIGABRT, then SIGKILL after %gs) and starting another",
                      self._describe(row), process.pid, why, ABORT_GRACE_S)  # fmt: skip
            self.aborted_at[row] = now
            try:
                os.kill(process.pid, signal.SIGABRT)
                # A stopped process (SIGSTOP, a debugger detached badly) runs its SIGABRT handler
                # only once continued: then it says where it was and dies without waiting for SIGKILL.
                os.kill(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def _wait(self, timeout: float) -> None:
        """Until a live process dies, or ``timeout``."""
        sentinels = [p.sentinel for row, p in self.processes.items() if row not in self.reaped]
        if sentinels:
            wait(sentinels, timeout=timeout)
        else:
            time.sleep(timeout)

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
        from service.startup import StartupError, bind_listener, check_repository, port_in_use

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
        locks = []
        for protocol, port in (("HTTP", http_port), ("gRPC", grpc_port)):
            try:
                locks.append(housekeeping.lock_port(port))
            except OSError:  # another cnnserve serves it (with SO_REUSEPORT our bind could not tell)
                for sock in reserved + locks:
                    sock.close()
                log.error("%s", port_in_use(protocol, s.host, port))
                return 1
        reserved += locks
        swept, freed = housekeeping.sweep_run_dirs()
        if swept:
            log.info(
                "removed %d run folder(s) of servers that died without cleaning up (%s of /dev/shm)",
                swept,
                housekeeping.mib(freed),
            )
        try:
            self.run_dir = shared_memory.make_run_dir()
        except OSError as e:
            log.error("cannot make the server's folder in /dev/shm: %s", e.strerror)
            return 1
        try:
            return self._run(http_port, grpc_port)
        finally:
            self._kill_all()
            for sock in reserved:
                sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _run(self, http_port: int, grpc_port: int) -> int:
        from service.metrics import ModelStats

        s = self.settings
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
        if s.max_connections_per_client:
            self.child_settings.max_connections_per_client = max(1, -(-s.max_connections_per_client // self.workers))
        self.child_settings.max_buffered_bytes = max(1024, s.max_buffered_bytes // self.workers)
        # Explanations too: each costs ~226 forward passes an image, and their limits are what
        # keeps the device and the cores for predictions.
        self.child_settings.explain_concurrency = max(1, s.explain_concurrency // self.workers)
        self.child_settings.explain_queue_size = s.explain_queue_size // self.workers
        # CUDA that cannot run here is said once, by the supervisor, not once per child.
        from service.inference.devices import usable_providers

        usable, reason = usable_providers(s.providers)
        if reason is not None and not s.require_gpu:
            log.warning("%s: running on the CPU", reason)
            self.child_settings.providers = usable or ["CPUExecutionProvider"]
        c = self.child_settings
        log.info(
            "each process: %d ONNX Runtime intra-op thread(s); each front end: up to %d connections, "
            "%d buffered request bytes, %d explanation(s) at once and %d waiting",
            c.intra_op_threads,
            c.max_connections,
            c.max_buffered_bytes,
            c.explain_concurrency,
            c.explain_queue_size,
        )
        self._plan_precision()
        shape = shared_memory.TableShape(
            str(self.run_dir / "control"),
            self.executors,
            self.workers,
            self._model_columns(),
            ModelStats.width(s.max_batch_size),
        )
        slots = s.max_queue_size + 4 * s.max_batch_size
        self.shm_needed, refusal = housekeeping.room_for_slabs(
            self.run_dir, self.specs, self.workers, self.executors, slots
        )
        if refusal is not None:
            log.error("%s", refusal)
            return 1
        try:
            self.table = shared_memory.ControlTable(shape, create=True)
        except shared_memory.NoSharedMemory as e:
            log.error("%s", e)
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("starting %d front end(s) and %s", self.workers, self._placement_text())
        for row in range(shape.processes):
            self._spawn(row)
        return self._supervise(http_port, grpc_port)

    def _supervise(self, http_port: int, grpc_port: int) -> int:
        s, table = self.settings, self.table
        frontends = list(range(self.executors, self.executors + self.workers))
        listening = ready = False
        while not self.stop_requested:
            self._wait(0.05)
            now_ready = {int(r) for r in (table.state == shared_memory.READY).nonzero()[0]}
            for row in sorted((now_ready - self.ready_now) & self.ever_ready):  # a replacement
                log.info("%s (pid %d) is ready, %.2fs after its start", self._describe(row),
                         self.processes[row].pid, time.monotonic() - self.spawned_at[row])  # fmt: skip
            self.ever_ready |= now_ready
            self.ready_now |= now_ready
            self._watch_hangs()
            failed = self._reap()
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
            self._wait(min(0.05, max(0.0, until - time.monotonic())))
            self._reap(halt_on_failure=False)
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
    logs.configure(settings.log_level, settings.log_format)
    return Supervisor(settings, workers, placement, gpus, frontend_main).run()
