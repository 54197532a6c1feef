"""One process, one event loop: the gRPC and HTTP servers, the core, and graceful drain.

Start-up: listeners first (so liveness answers and readiness says "loading"), then models are
loaded and warmed in a thread, then readiness turns true.
SIGTERM/SIGINT: readiness turns false at once (HTTP 503, gRPC health NOT_SERVING) while both
servers keep serving for ``drain_seconds``; then they stop accepting, everything admitted is
finished (bounded by ``shutdown_timeout_seconds``), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time

import uvicorn

from service.core import InferenceCore
from service.grpc_api.server import GrpcServer
from service.http_api.application import create_app
from service.http_api.server_config import uvicorn_config
from service.metrics import Metrics
from service.runtime import GpuRequired
from service.settings import Settings

log = logging.getLogger("cnnserve")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


async def serve(settings: Settings) -> int:
    started = time.monotonic()
    metrics = Metrics()
    core = InferenceCore(settings, metrics)
    try:
        grpc_server = GrpcServer(core, metrics, settings)
        sock = _bind(settings.host, settings.http_port)
    except (OSError, RuntimeError) as e:  # port in use, address not local, ...
        log.error(
            "cannot listen on %s (http %d, grpc %d): %s", settings.host, settings.http_port, settings.grpc_port, e
        )
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
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await grpc_server.start()
    await http_server.startup(sockets=[sock])
    http_loop = asyncio.create_task(http_server.main_loop())
    log.info("listening http=%s:%d grpc=%s:%d", settings.host, http_port, settings.host, grpc_server.port)

    loader = asyncio.create_task(asyncio.to_thread(core.load))
    await asyncio.wait({loader, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if loader.done():
        try:
            loader.result()
            core.start()
            await grpc_server.set_serving(True)
            log.info(
                "ready in %.2fs: %s",
                time.monotonic() - started,
                ", ".join(
                    f"{m.name}/{m.version} on {m.runtime.provider}"
                    + (f", batches padded to {m.runtime.pad_to}" if m.runtime.pad_to else "")
                    for m in core.all_models()
                ),
            )
        except (GpuRequired, FileNotFoundError, ValueError, OSError) as e:
            log.error("cannot load models: %s", e)
            exit_code = 1
            stop.set()
        await stop.wait()
    if exit_code == 0:
        log.info("draining: readiness is false, serving for %.1fs more", settings.drain_seconds)
        core.begin_drain()
        await grpc_server.set_serving(False)
        await asyncio.sleep(settings.drain_seconds)
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
    await core.close()
    if not loader.done():
        loader.cancel()
    log.info("stopped")
    return exit_code


def run(settings: Settings) -> int:
    from service import logs

    logs.configure(settings.log_level, settings.log_format)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux; fall back elsewhere
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(Settings()))
