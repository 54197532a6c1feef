"""One gRPC method's bookkeeping: request metrics, and domain errors turned into the call's status."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service.errors import ServiceError, grpc_status
from service.metrics import Metrics


class Instrumented:
    """Records cnnserve_requests_total / _request_duration_seconds for one gRPC method and turns
    domain errors into the call's status."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.duration = metrics.request_duration.labels("grpc", method)
        self.ok = metrics.requests.labels("grpc", method, "OK")

    async def __call__(self, context: grpc.aio.ServicerContext, work):
        started = time.perf_counter()
        try:
            response = await work
        except ServiceError as e:
            code = grpc_status(e)
            self.metrics.requests.labels("grpc", self.method, code.name).inc()
            if not e.counted_by_batcher:
                self.metrics.rejected.labels(e.reason).inc()
            self.duration.observe(time.perf_counter() - started)
            await context.abort(code, e.message)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            self.metrics.requests.labels("grpc", self.method, code.name).inc()
            raise
        self.ok.inc()
        self.duration.observe(time.perf_counter() - started)
        return response


def rpc(method: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]):
    """Decorate a servicer's async RPC method (on an object with a ``metrics`` attribute): its
    metrics are recorded under the method's name and domain errors become the call's status."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self, request, context: grpc.aio.ServicerContext):
        instruments = self.__dict__.setdefault("_instruments", {})
        instrumented = instruments.get(name)
        if instrumented is None:
            instrumented = instruments[name] = Instrumented(self.metrics, name)
        return await instrumented(context, method(self, request, context))

    return handler
