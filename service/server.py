"""One server process's life: the gRPC and HTTP listeners, the core, readiness, graceful drain.

It is the whole server with ``--workers 1``, and each front end of a multi-process server
(``service.workers.supervisor``), which differs in a :class:`FrontendRole`: its listeners share the ports
(SO_REUSEPORT), its readiness and statistics cover every process of the server, and its models
run either in the device executors or, with ``--executor worker``, in the process itself.

Start-up: the model repository is checked before any port is bound; listeners start first (so
liveness answers and readiness says "loading"), then models are loaded and warmed in a thread
(or the device executors are connected), then readiness turns true.
SIGTERM (or Ctrl-C): readiness turns false at once (HTTP 503, gRPC health NOT_SERVING) while both
servers keep serving for ``drain_seconds``; then they stop accepting, everything admitted is
finished (bounded by ``shutdown_timeout_seconds``), and the process exits 0. A second Ctrl-C
stops at once with exit status 130.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from service.grpc_api.server import GrpcServer
from service.http_api.application import create_app
from service.http_api.server_config import uvicorn_config
from service.inference import repository
from service.inference.core import InferenceCore
from service.metrics import Metrics
from service.settings import Settings
from service.workers import shared_memory as ipc
from service.workers.remote_batcher import ExecutorClient

log = logging.getLogger("cnnserve")


@dataclass
class FrontendRole:
    """What a front end of a multi-process server is told by the supervisor."""

    index: int
    table: ipc.ControlTable
    run_dir: str
    executors: int  # device executors to connect to; 0: this process runs the models itself

    @property
    def row(self) -> int:
        return self.table.shape.frontend_row(self.index)


class StartupError(Exception):
    """Something the user must fix before the server can start; its message is the one line shown."""


def port_in_use(protocol: str, host: str, port: int) -> StartupError:
    flag = f"--{protocol.lower()}-port"
    return StartupError(f"{protocol} port {port} is already in use on {host}: stop the other server or pick another "
                        f"port with {flag} (CNNSERVE_{protocol.upper()}_PORT)")  # fmt: skip


def bind_listener(host: str, port: int, protocol: str, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket for ``protocol`` (not listening yet); a taken port is a StartupError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise port_in_use(protocol, host, port) from None
        raise StartupError(f"cannot listen on {host}:{port} for {protocol}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def check_repository(settings: Settings) -> list[repository.ModelSpec]:
    """The model repository's versions, or a StartupError naming its absolute path."""
    try:
        return repository.scan(settings.model_repository)
    except FileNotFoundError as e:
        raise StartupError(str(e)) from None


def _describe_ready(core: InferenceCore) -> str:
    return ", ".join(
        f"{m.name}/{m.version} ({m.runtime.precision}) on {m.runtime.provider}"
        + (f", batches padded to {m.runtime.pad_to}" if m.runtime.pad_to else "")
        for m in core.all_models()
    )


async def serve(settings: Settings, role: FrontendRole | None = None) -> int:
    started = time.monotonic()
    metrics = Metrics()
    if role is not None:
        metrics.process_name = f"frontend-{role.index}"
    core = InferenceCore(settings, metrics, role.table if role else None, role.row if role else 0)
    try:
        if role is None:
            check_repository(settings)
            # Probe the gRPC port ourselves: grpc-core's own failure is a raw log line.
            if settings.grpc_port:
                bind_listener(settings.host, settings.grpc_port, "gRPC").close()
        sock = bind_listener(settings.host, settings.http_port, "HTTP", reuse_port=role is not None)
        try:
            grpc_server = GrpcServer(core, metrics, settings, reuse_port=role is not None)
        except (OSError, RuntimeError):
            sock.close()
            raise port_in_use("gRPC", settings.host, settings.grpc_port) from None
    except StartupError as e:
        log.error("%s", e)
        return 1
    http_port = sock.getsockname()[1]
    config = uvicorn_config(create_app(core, metrics), settings)
    http_server = uvicorn.Server(config)
    # Server.serve() would install its own signal handlers; we drive its steps ourselves so that
    # SIGTERM starts our drain instead.
    config.load()
    http_server.lifespan = config.lifespan_class(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if role is None:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, _on_interrupt, stop)
    else:  # a front end stops when its supervisor says so
        loop.add_signal_handler(ipc.STOP_SIGNAL, stop.set)

    await grpc_server.start()
    await http_server.startup(sockets=[sock])
    http_loop = asyncio.create_task(http_server.main_loop())
    if role is None:
        log.info("listening http=%s:%d grpc=%s:%d", settings.host, http_port, settings.host, grpc_server.port)
    else:
        role.table.pid[role.row] = os.getpid()
        role.table.state[role.row] = ipc.LISTENING
        heart = asyncio.create_task(_heartbeat(role))

    clients: list[ExecutorClient] = []
    loader: asyncio.Task[Any]  # waits for the executors, or loads the models here
    if role is not None and role.executors:
        slots = settings.max_queue_size + 4 * settings.max_batch_size
        clients = [ExecutorClient(role.table, role.index, e, role.run_dir, slots) for e in range(role.executors)]
        tasks = [asyncio.create_task(c.run()) for c in clients]
        waits: list[asyncio.Task[Any]] = [asyncio.create_task(c.connected.wait()) for c in clients]
        # The models run in the executors; /explain's layers are computed here (service.explain.layers).
        waits.append(asyncio.create_task(asyncio.to_thread(core.load_layers)))
        loader = asyncio.create_task(asyncio.wait(waits))
    else:
        tasks = []
        loader = asyncio.create_task(asyncio.to_thread(core.load))
    await asyncio.wait({loader, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    watcher = None
    if loader.done():
        try:
            loader.result()
            if clients:
                core.start_remote(clients)
            else:
                core.start()
            if role is None:
                await grpc_server.set_serving(True)
                log.info("ready in %.2fs: %s", time.monotonic() - started, _describe_ready(core))
            else:
                role.table.state[role.row] = ipc.READY
                watcher = asyncio.create_task(_follow_shared_state(core, grpc_server, stop))
        except Exception as e:  # noqa: BLE001 - any model that fails to load: one line, exit 1
            log.error("cannot load models: %s", e)
            exit_code = 1
            stop.set()
        await stop.wait()
    if exit_code == 0:
        core.begin_drain()
        await grpc_server.set_serving(False)
        if settings.drain_seconds > 0:
            log.info("draining: readiness is false, serving for %.1fs more (Ctrl-C again stops now)",
                     settings.drain_seconds)  # fmt: skip
            await asyncio.sleep(settings.drain_seconds)
    if role is None:
        log.info("closing listeners; finishing admitted requests (at most %.1fs)", settings.shutdown_timeout_seconds)
    http_server.should_exit = True
    await http_loop
    *_, drained = await asyncio.gather(
        http_server.shutdown(sockets=[sock]),
        grpc_server.stop(settings.shutdown_timeout_seconds),
        core.drain(settings.shutdown_timeout_seconds),
    )
    if not drained:
        log.warning(
            "shutdown timeout (%.1fs) passed with requests still queued; they are answered 503 / UNAVAILABLE",
            settings.shutdown_timeout_seconds,
        )
    for task in (watcher, loader, heart if role is not None else None, *tasks):
        if task is not None and not task.done():
            task.cancel()
    await core.close()
    if role is not None:
        role.table.state[role.row] = ipc.STOPPED
    else:
        log.info("stopped")
    return exit_code


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


async def _follow_shared_state(core: InferenceCore, grpc_server: GrpcServer, stop: asyncio.Event) -> None:
    """A front end's gRPC health follows the whole server's readiness (a drain, a restarting
    process) within 50 ms; HTTP readiness reads the shared table on every call anyway."""
    serving = None
    ticks = 0
    while not stop.is_set():
        ticks += 1
        if ticks % 20 == 0:  # every second: this process's CPU, for per-process load in /metrics
            core.metrics.record_process_cpu()
        ready = core.is_ready
        if ready != serving:
            serving = ready
            core.metrics.ready.set(1 if ready else 0)
            await grpc_server.set_serving(ready)
        await asyncio.sleep(0.05)


def _run_loop(coro) -> int:
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


def frontend_main(settings_json: str, table_shape: dict, index: int, run_dir: str, executors: int) -> None:
    """Entry point of a front-end process (spawned by ``service.workers.supervisor``)."""
    from service import logs

    settings = Settings.model_validate_json(settings_json)
    logs.configure(settings.log_level, settings.log_format)
    ipc.become_child()
    table = ipc.ControlTable(ipc.TableShape(**table_shape))
    role = FrontendRole(index, table, str(Path(run_dir)), executors)
    sys.exit(_run_loop(serve(settings, role)))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(Settings()))
