"""One gRPC method's bookkeeping: request metrics, domain errors turned into the call's status
(with a retry hint when overloaded), and requests that are not valid protobuf answered
INVALID_ARGUMENT instead of grpc's UNKNOWN plus a logged traceback."""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service import tracing
from service.errors import Overloaded, ServiceError, grpc_status
from service.metrics import Metrics

RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRFC A6: how long a client's retry policy should wait
UNTRACED = frozenset({"ModelReady"})  # readiness probes, like HTTP's, make no traces


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
            trailers: tuple = ()
            if isinstance(e, Overloaded):
                trailers = ((RETRY_PUSHBACK, str(max(1, math.ceil(e.retry_after_s * 1000)))),)
            await context.abort(code, e.message, trailing_metadata=trailers)
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
        work = method(self, request, context)
        if tracing.ENABLED and name not in UNTRACED:
            work = tracing.traced_grpc(name, context, work)
        return await instrumented(context, work)

    return handler


class _Malformed:
    """What a request that failed to deserialize becomes, so its handler can refuse it cleanly."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            return _Malformed(f"{type(e).__name__}: {e}")

    return safe


def _guarded(handler: grpc.RpcMethodHandler, metrics: Metrics, method: str) -> grpc.RpcMethodHandler:
    """The same unary-unary async handler, with a deserializer that cannot raise and a behaviour
    that answers INVALID_ARGUMENT to what it could not parse. Other kinds are returned as they are."""
    behavior = handler.unary_unary
    if behavior is None or handler.request_streaming or not inspect.iscoroutinefunction(behavior):
        return handler
    name = method.rsplit("/", 1)[-1]

    async def checked(request, context):
        if type(request) is _Malformed:
            metrics.requests.labels("grpc", name, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            metrics.rejected.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid message: {request.error}")
        return await behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        checked,
        request_deserializer=_safe_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.cache: dict[str, Any] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        if method not in self.cache:
            found = self.inner.service(handler_call_details)
            self.cache[method] = None if found is None else _guarded(found, self.metrics, method)
        return self.cache[method]


class GuardedRegistration:
    """Stands in for the grpc.aio server while generated ``add_*_to_server`` functions register a
    service, so that every unary method of it refuses malformed requests with INVALID_ARGUMENT.
    The checks cost one type test per call."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics) -> None:
        self.server = server
        self.metrics = metrics

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h, self.metrics) for h in handlers))

    def add_registered_method_handlers(self, service: str, method_handlers: dict) -> None:
        self.server.add_registered_method_handlers(
            service, {m: _guarded(h, self.metrics, f"/{service}/{m}") for m, h in method_handlers.items()}
        )
