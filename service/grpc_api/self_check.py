"""The gRPC side of readiness: a real grpc.health.v1 Check on this process's own gRPC server, so
that HTTP's /readyz (the probe Kubernetes uses) fails when its gRPC server cannot serve (issue 17:
the gRPC port was exhausted while the HTTP probes kept the pod Ready).

One check at a time, its answer kept for ``ttl`` seconds: a storm of /readyz requests costs at
most one gRPC call per ``ttl``. Only the call failing counts (no connection, deadline, refused):
NOT_SERVING is readiness's own answer, which /readyz reads from the core already. One process
checks its port over loopback; a front end of several checks its own server on a Unix socket of
its own (``service.server.Listeners``): over the shared port (SO_REUSEPORT) the kernel could hand
the check to another front end, and one hung front end then made the others unready too.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def loopback_target(host: str, port: int) -> str:
    """Where to reach a listener bound to ``host``: a wildcard address is reached on loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class GrpcSelfCheck:
    def __init__(self, target: str, timeout: float = 1.0, ttl: float = 1.0) -> None:
        self.target = target
        self.timeout = timeout
        self.ttl = ttl
        self.channel: grpc.aio.Channel | None = None
        self.answer: str | None = None
        self.answered_at = -float("inf")
        self.running: asyncio.Task[str | None] | None = None

    async def failure(self) -> str | None:
        """None when the gRPC port answers a health check, else why not."""
        if time.monotonic() - self.answered_at < self.ttl:
            return self.answer
        if self.running is None:
            self.running = asyncio.create_task(self._check())
        running = self.running
        try:
            return await asyncio.shield(running)
        finally:
            if running.done() and self.running is running:
                self.running = None

    async def _check(self) -> str | None:
        if self.channel is None:
            # One channel, kept: a probe should not cost a TCP and HTTP/2 handshake each time.
            self.channel = grpc.aio.insecure_channel(self.target, options=[("grpc.enable_retries", 0)])
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout)
            answer = None
        except grpc.aio.AioRpcError as e:
            answer = f"gRPC server at {self.target} does not answer a health check: {e.code().name}"
        self.answer, self.answered_at = answer, time.monotonic()
        return answer

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
