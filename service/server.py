"""One server process's composition root and life: it builds the parts (models -> core ->
explainer -> the data plane the HTTP and gRPC listeners are handed), then runs readiness and the
graceful drain.

It is the whole server with ``--workers 1``, and each front end of a multi-process server
(``service.workers.supervisor``), which differs in a :class:`FrontendRole`: its listeners share the ports
(SO_REUSEPORT), its readiness and statistics cover every process of the server, and its models
run either in the device executors or, with ``--executor worker``, in the process itself.

Start-up: the model repository is checked before any port is bound; listeners start first (so
liveness answers and readiness says "loading"), then models are loaded and warmed in a thread
(or the device executors are connected), then readiness turns true. A front end replacing one
that died while another serves opens its listeners only once ready (see ``serve``).
SIGTERM (or Ctrl-C): readiness turns false at once (HTTP 503, gRPC health NOT_SERVING) while both
servers keep serving for ``drain_seconds``; then they stop accepting, everything admitted is
finished (bounded by ``shutdown_timeout_seconds``), and the process exits 0. A second Ctrl-C
stops at once with exit status 130.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from service import tracing
from service.buffers import BufferedBytes
from service.dataplane import DataPlane
from service.explain.explainer import Explainer
from service.explain.layers import LayerModels
from service.grpc_api.self_check import GrpcSelfCheck, loopback_target
from service.grpc_api.server import GrpcServer
from service.http_api.application import create_app
from service.http_api.server_config import uvicorn_config
from service.inference.core import InferenceCore
from service.inference.decoding import DecodePool
from service.inference.repository import ModelSpec
from service.inference.serving import BatchQueue, BatchWatch, LoadedModel, QueueFactory, ServedModel, StatsSource
from service.liveness import Liveness
from service.metrics import Metrics, ModelStats
from service.model_control.controller import ModelController, VersionOpener
from service.model_control.fleet import FleetBarrier
from service.readiness import Readiness
from service.security.setup import Security, SecurityError
from service.settings import Settings
from service.startup import StartupError, bind_listener, check_repository, port_in_use
from service.workers import shared_memory
from service.workers.remote_batcher import ExecutorClient, RemoteBatcher

log = logging.getLogger("cnnserve")


@dataclass
class FrontendRole:
    """What a front end of a multi-process server is told by the supervisor."""

    index: int
    table: shared_memory.ControlTable
    run_dir: str
    executors: int  # device executors to connect to; 0: this process runs the models itself

    @property
    def row(self) -> int:
        return self.table.shape.frontend_row(self.index)


def _describe_ready(core: InferenceCore) -> str:
    if not core.models():  # explicit model control without --load-model
        return "no model loaded yet"
    return ", ".join(
        f"{m.name}/{m.version} ({m.runtime.precision}) on {m.runtime.provider}"
        + (f", batches padded to {m.runtime.pad_to}" if m.runtime.pad_to else "")
        for m in core.models()
    )


def build_plane(settings: Settings, metrics: Metrics, role: FrontendRole | None) -> DataPlane:
    """The parts one process serves with. A front end of a multi-process server keeps its
    statistics in its row of the shared table and answers readiness for the whole server."""
    stats: StatsSource | None = None
    liveness = Liveness(settings.hang_timeout_seconds)
    watch: BatchWatch | None = liveness.watch  # one process: /healthz judges its batches
    if role is not None:
        table, row = role.table, role.row

        def stats(index: int) -> tuple[ModelStats, np.ndarray | None]:
            return ModelStats(table.stats[row, index]), table.stats[:, index]

        def watch(index: int, model: str) -> Callable[[int, int], None]:  # --executor worker: the supervisor judges
            return table.batch_watch(row, index)

    pool = DecodePool(settings, metrics)
    core = InferenceCore(settings, metrics, pool, stats, watch)
    layer_models = LayerModels()
    controller = None
    if settings.model_control_mode != "none":
        # Versions are loaded, swapped and retired by the controller, at start-up and after.
        barrier = None
        if role is not None:  # front ends swap together (service.model_control.fleet)
            timeout = 2 * settings.repository_poll_seconds + 30
            barrier = FleetBarrier(role.run_dir, role.index, role.table.shape.frontends, timeout)
        controller = ModelController(core, layer_models, metrics, settings, barrier)
    return DataPlane(
        settings=settings,
        metrics=metrics,
        core=core,
        explainer=Explainer(core, layer_models, settings, metrics),
        layer_models=layer_models,
        readiness=Readiness(metrics, role.table if role else None),
        liveness=liveness,
        buffers=BufferedBytes(settings.max_buffered_bytes),
        pool=pool,
        repository=controller,
    )


def remote_queues(clients: list[ExecutorClient], settings: Settings) -> QueueFactory:
    """The queues of the model versions the device executors serve, for ``InferenceCore.start``."""

    def make(index: int, model: ServedModel, stats: ModelStats) -> BatchQueue:
        return RemoteBatcher(
            clients,
            [index] * len(clients),
            clients[0].models[index],
            settings.max_batch_size,
            settings.max_queue_delay_ms / 1000.0,
            clients[0].max_queue_size,
        )

    return make


def remote_versions(clients: list[ExecutorClient], role: FrontendRole, settings: Settings) -> VersionOpener:
    """Model control with device executors: each executor loads the version (once for every front
    end: its files' key), and this front end serves it through their slots."""

    async def open_version(spec: ModelSpec, key: str) -> LoadedModel:
        request = {"name": spec.name, "version": spec.version, "path": str(spec.path.resolve()), "key": key}
        slot, model = await clients[0].load(request)
        slots = [slot]
        try:  # the same slot in every executor, so the version has one statistics column
            for client in clients[1:]:
                slots.append((await client.load({**request, "slot": slot}))[0])
        except Exception:
            for client, taken in zip(clients, slots):
                client.release(taken)
            raise
        batcher = RemoteBatcher(clients, slots, model, settings.max_batch_size, settings.max_queue_delay_ms / 1000.0,
                                clients[0].max_queue_size, held=True)  # fmt: skip
        table = role.table
        return LoadedModel(model, batcher, ModelStats(table.stats[role.row, slot]), stats_rows=table.stats[:, slot])

    return open_version


class Listeners:
    """One process's HTTP and gRPC listeners: bound together (a taken port is a StartupError),
    answering from :meth:`start` on, closed together."""

    def __init__(self, settings: Settings, plane: DataPlane, metrics: Metrics, security: Security,
                 role: FrontendRole | None) -> None:  # fmt: skip
        shared = role is not None  # front ends of a multi-process server share the ports (SO_REUSEPORT)
        # /readyz also asks the gRPC server for its health (issue 17): in plaintext with health open
        # only; under TLS the check would need the server's name and, with mutual TLS, a client
        # certificate it does not have (README "Secure it": probe gRPC health there). A front end
        # asks its own server, on a Unix socket of its own: over the shared port the kernel may hand
        # the check to another front end (a hung one would make every front end unready).
        self_check = security.tls is None and "health" not in security.access.restricted
        private = str(Path(role.run_dir) / f"fe{role.index}-grpc.sock") if self_check and role else None
        self.sock = bind_listener(settings.host, settings.http_port, "HTTP", reuse_port=shared)
        try:
            # grpc-core listens from here on (connections wait in its backlog until start()).
            self.grpc = GrpcServer(plane, metrics, settings, reuse_port=shared, security=security,
                                   private_socket=private)  # fmt: skip
        except (OSError, RuntimeError):
            self.sock.close()
            raise port_in_use("gRPC", settings.host, settings.grpc_port) from None
        self.http_port = self.sock.getsockname()[1]
        app, served = create_app(plane, metrics)
        if self_check:
            target = f"unix:{private}" if private else loopback_target(settings.host, self.grpc.port)
            app.state.grpc_self_check = GrpcSelfCheck(target)
        config = uvicorn_config(security.http_app(served, metrics), settings, security.http_ssl)
        self.http = uvicorn.Server(config)
        # Server.serve() would install its own signal handlers; we drive its steps ourselves so that
        # SIGTERM starts our drain instead.
        config.load()
        self.http.lifespan = config.lifespan_class(config)
        self._http_loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.grpc.start()
        await self.http.startup(sockets=[self.sock])
        self._http_loop = asyncio.create_task(self.http.main_loop())

    async def close(self, grace: float) -> None:
        """Stop accepting; finish what was admitted for up to ``grace`` seconds."""
        self.http.should_exit = True
        if self._http_loop is not None:
            await self._http_loop
        await asyncio.gather(self.http.shutdown(sockets=[self.sock]), self.grpc.stop(grace))


async def serve(settings: Settings, role: FrontendRole | None = None) -> int:
    started = time.monotonic()
    metrics = Metrics()
    if role is not None:
        metrics.process_name = f"frontend-{role.index}"
    tracing.start(settings, metrics.process_name, metrics.registry)
    plane = build_plane(settings, metrics, role)
    core, readiness = plane.core, plane.readiness
    # A replacement front end joins the ports only once it can serve: while another front end
    # serves, the kernel then sends it no connection it would answer "loading" (SO_REUSEPORT
    # spreads them over every listener). With none serving (the first start, every front end
    # restarting at once) it listens at once, and every front end's readiness says so meanwhile.
    # LISTENING is claimed before the others are looked at: a front end turning READY at the same
    # moment then sees the claim (its readiness false) or is seen (this one waits).
    join_when_ready = False
    if role is not None:
        role.table.state[role.row] = shared_memory.LISTENING
        join_when_ready = role.table.frontend_serving(besides=role.row)
        if join_when_ready:
            role.table.state[role.row] = shared_memory.STARTING
    listeners: Listeners | None = None
    try:
        if role is None:
            check_repository(settings)
            # Probe the gRPC port ourselves: grpc-core's own failure is a raw log line.
            if settings.grpc_port:
                bind_listener(settings.host, settings.grpc_port, "gRPC").close()
        try:
            security = Security(settings)  # TLS files and access keys, read by each process
        except SecurityError as e:
            raise StartupError(str(e)) from None
        if not join_when_ready:
            listeners = Listeners(settings, plane, metrics, security, role)
    except StartupError as e:
        log.error("%s", e)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if role is None:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, _on_interrupt, stop)
    else:  # a front end stops when its supervisor says so
        loop.add_signal_handler(shared_memory.STOP_SIGNAL, stop.set)

    if listeners is not None:
        await listeners.start()
    tls_watcher = security.start_watching()
    if role is None or role.index == 0:
        log.info("%s", security.describe())
    heart: asyncio.Task[None] | None = None  # a front end's event loop beats in the shared table
    if role is None:
        assert listeners is not None
        log.info("listening http=%s:%d grpc=%s:%d", settings.host, listeners.http_port, settings.host,
                 listeners.grpc.port)  # fmt: skip
    else:
        role.table.pid[role.row] = os.getpid()
        heart = asyncio.create_task(_heartbeat(role))

    clients: list[ExecutorClient] = []
    loader: asyncio.Task[Any]  # waits for the executors, or loads the models here
    if role is not None and role.executors:
        slots = settings.max_queue_size + 4 * settings.max_batch_size
        clients = [ExecutorClient(role.table, role.index, e, role.run_dir, slots) for e in range(role.executors)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        if plane.repository is not None:
            # Model control: the controller has the executors load what its mode says (and loads
            # each version's layers here) once they are connected.
            plane.repository.open_version = remote_versions(clients, role, settings)
            loader = asyncio.create_task(_connect_then_load(clients, plane.repository))
        else:
            waits: list[asyncio.Task[Any]] = [asyncio.create_task(c.connected.wait()) for c in clients]
            # The models run in the executors; /explain's layers are computed here (service.explain.layers).
            waits.append(asyncio.create_task(asyncio.to_thread(plane.layer_models.load, settings.model_repository)))
            loader = asyncio.create_task(asyncio.wait(waits))
    elif plane.repository is not None:
        # Model control: the controller loads what its mode says (and each version's layers).
        tasks = []
        loader = asyncio.create_task(plane.repository.start())
    else:
        tasks = []

        def load() -> None:
            core.load()
            plane.layer_models.load(settings.model_repository)

        loader = asyncio.create_task(asyncio.to_thread(load))
    await asyncio.wait({loader, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    watcher = None
    if loader.done():
        try:
            loader.result()
            if clients:
                core.start(clients[0].models, remote_queues(clients, settings))
                readiness.models_loaded(report=False)  # the whole server's state sets the gauge
            else:
                core.start()
                readiness.models_loaded()
            if plane.repository is not None:
                plane.repository.start_polling()
            if listeners is None:
                listeners = Listeners(settings, plane, metrics, security, role)
                await listeners.start()
            if role is None:
                await listeners.grpc.set_serving(True)
                log.info("ready in %.2fs: %s", time.monotonic() - started, _describe_ready(core))
            else:
                role.table.state[role.row] = shared_memory.READY
                watcher = asyncio.create_task(_follow_shared_state(readiness, metrics, listeners.grpc, stop))
        except StartupError as e:  # a replacement front end's ports, bound late
            log.error("%s", e)
            exit_code = 1
            stop.set()
        except Exception as e:  # noqa: BLE001 - any model that fails to load: one line, exit 1
            log.error("cannot load models: %s", e)
            exit_code = 1
            stop.set()
        await stop.wait()
    if exit_code == 0:
        readiness.begin_drain()
        if listeners is not None:
            await listeners.grpc.set_serving(False)
        if settings.drain_seconds > 0:
            log.info(
                "draining: readiness is false, serving for %.1fs more (Ctrl-C again stops now)", settings.drain_seconds
            )
            await asyncio.sleep(settings.drain_seconds)
    if role is None:
        log.info("closing listeners; finishing admitted requests (at most %.1fs)", settings.shutdown_timeout_seconds)
    grace = settings.shutdown_timeout_seconds
    *_, drained = await asyncio.gather(listeners.close(grace) if listeners else asyncio.sleep(0), core.drain(grace))
    if not drained:
        log.warning(
            "shutdown timeout (%.1fs) passed with requests still queued; they are answered 503 / UNAVAILABLE",
            settings.shutdown_timeout_seconds,
        )
    for task in (watcher, tls_watcher, loader, heart, *tasks):
        if task is not None and not task.done():
            task.cancel()
    if plane.repository is not None:
        await plane.repository.close()
    await core.close()
    for client in clients:
        await client.close()
    if role is not None:
        role.table.state[role.row] = shared_memory.STOPPED
    else:
        log.info("stopped")
    return exit_code


async def _connect_then_load(clients: list[ExecutorClient], controller: ModelController) -> None:
    await asyncio.gather(*(c.connected.wait() for c in clients))
    await controller.start()


_interrupts = 0


def _on_interrupt(stop: asyncio.Event) -> None:
    global _interrupts
    _interrupts += 1
    if _interrupts > 1:
        log.warning("second Ctrl-C: stopping now")
        logging.shutdown()
        os._exit(130)
    stop.set()


#: How often a front end's event loop beats in the shared table: a small fraction of any sensible
#: --hang-timeout-seconds, and cheap (one float written).
HEARTBEAT_S = 0.25


async def _heartbeat(role: FrontendRole) -> None:
    """The event loop's heartbeat: if it stops (a callback that never returns, SIGSTOP), the
    supervisor replaces this process (``service.workers.policy.hung``)."""
    while True:
        role.table.heartbeat(role.row)
        await asyncio.sleep(HEARTBEAT_S)


async def _follow_shared_state(
    readiness: Readiness, metrics: Metrics, grpc_server: GrpcServer, stop: asyncio.Event
) -> None:
    """A front end's gRPC health follows the whole server's readiness (a drain, a restarting
    process) within 50 ms; HTTP readiness reads the shared table on every call anyway."""
    serving = None
    ticks = 0
    while not stop.is_set():
        ticks += 1
        if ticks % 20 == 0:  # every second: this process's CPU, for per-process load in /metrics
            metrics.record_process_cpu()
        ready = readiness.is_ready
        if ready != serving:
            serving = ready
            metrics.ready.set(1 if ready else 0)
            await grpc_server.set_serving(ready)
        await asyncio.sleep(0.05)


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux; fall back elsewhere
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(settings: Settings) -> int:
    """The whole server in this one process."""
    from service import logs

    logs.configure(settings.log_level, settings.log_format)
    return _run_loop(serve(settings))


def frontend_main(settings_json: str, table_shape: dict[str, Any], index: int, run_dir: str, executors: int) -> None:
    """Entry point of a front-end process (spawned by ``service.workers.supervisor``)."""
    from service import logs

    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_level, settings.log_format)
    shared_memory.become_child()
    table = shared_memory.ControlTable(shared_memory.TableShape(**table_shape))
    role = FrontendRole(index, table, str(Path(run_dir)), executors)
    sys.exit(_run_loop(serve(settings, role)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(Settings()))
