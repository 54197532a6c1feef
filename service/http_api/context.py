"""What every HTTP route shares: JSON responses, error mapping, metrics, body limits, deadlines,
and the race between a request's work and its client going away."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service import tracing
from service.ascii_numbers import parse_decimal, parse_uint
from service.dataplane import DataPlane
from service.errors import (
    BufferFull,
    Cancelled,
    InvalidParameter,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    http_status,
)
from service.metrics import Metrics

log = logging.getLogger("cnnserve.http")
TIMEOUT_HEADER = "x-request-timeout-ms"
BUFFERED_KEY = "cnnserve.buffered"  # request scope: body bytes this request holds against max_buffered_bytes
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def get_and_head(router: APIRouter, path: str, **kwargs: Any) -> Callable[[F], F]:
    """``@router.api_route(path, methods=["GET", "HEAD"])`` as two routes: one route with two
    methods gives both operations the same OpenAPI operationId (FastAPI warns "Duplicate Operation
    ID" at the first /openapi.json, and generated clients collide)."""

    def register(endpoint: F) -> F:
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        router.add_api_route(path, endpoint, methods=["HEAD"], name=f"{endpoint.__name__}_head", **kwargs)
        return endpoint

    return register


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(error: ServiceError) -> Response:
    headers = None
    if isinstance(error, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    elif isinstance(error, BufferFull):
        headers = {"Retry-After": "1"}
    return json_response({"error": error.message}, http_status(error), headers)


def internal_error(request: Request, exc: Exception) -> Response:
    """A bug's answer: 500, its type named, its traceback logged."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)


class HttpContext:
    """Per-app helpers bound to the data plane and metrics."""

    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane = plane
        self.core = plane.core
        self.metrics = metrics
        self.max_body = plane.settings.max_request_bytes
        self._counters: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    def record(self, method: str, status: int, started: float) -> None:
        # Label children are resolved once per (method, status): labels() costs a lock and a dict.
        counter = self._counters.get((method, status))
        if counter is None:
            counter = self._counters[(method, status)] = self.metrics.requests.labels("http", method, str(status))
        duration = self._durations.get(method)
        if duration is None:
            duration = self._durations[method] = self.metrics.request_duration.labels("http", method)
        counter.inc()
        duration.observe(time.perf_counter() - started)

    async def handle(self, method: str, work: Awaitable[Response], request: Request | None = None) -> Response:
        """Run a route's work: map domain errors to responses (and anything else to a 500, logged)
        and record metrics; then give back the body bytes ``request`` held against max_buffered_bytes."""
        started = time.perf_counter()
        if tracing.ENABLED and request is not None:  # routes without a request (metadata, health) are not traced
            work = tracing.traced_http(method, request, work)
        try:
            response = await work
        except ServiceError as e:
            if not e.counted_by_batcher:
                self.metrics.rejected.labels(e.reason).inc()
            response = error_response(e)
        except Exception as e:  # noqa: BLE001 - a bug or a broken model file: answered and counted as a 500
            # Counted here like any other answer, so the error-ratio alert sees it; Starlette's own
            # 500 would bypass the counter.
            log.exception("%s failed unexpectedly", method)
            response = json_response({"error": f"internal error: {type(e).__name__}"}, 500)
        finally:
            if request is not None:
                self.plane.buffers.release(request.scope.pop(BUFFERED_KEY, 0))
        self.record(method, response.status_code, started)
        return response

    @staticmethod
    async def unless_disconnected(work: Awaitable[T], request: Request) -> T:
        """Await ``work`` in this task; a watcher task cancels it if the client goes away, which
        also cancels its place in the batcher queue (dropped before compute). Call it only once
        the body has been read: the watcher consumes the request's remaining ASGI messages."""
        this = asyncio.current_task()
        assert this is not None  # called from a request's task
        gone = False

        async def watch() -> None:
            nonlocal gone
            await _disconnected(request)
            gone = True
            this.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            return await work
        except asyncio.CancelledError:
            if not gone:
                raise
            if sys.version_info >= (3, 11):  # 3.10 keeps no cancel count to take back
                this.uncancel()
            raise Cancelled("client disconnected") from None
        finally:
            watcher.cancel()

    def _hold(self, request: Request, n: int) -> None:
        """Count ``n`` more body bytes of ``request`` against max_buffered_bytes (BufferFull past it)."""
        self.plane.buffers.hold(n)
        request.scope[BUFFERED_KEY] = request.scope.get(BUFFERED_KEY, 0) + n

    async def body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it exceeds max_request_bytes and with 503
        when the bytes buffered across all requests would exceed max_buffered_bytes; a client that
        hangs up mid-upload is Cancelled. Call it from a route run by ``handle(..., request)``,
        which gives the bytes back."""
        began = time.monotonic() if tracing.ENABLED else 0.0
        declared = request.headers.get("content-length")
        if declared is not None:
            size = parse_uint(declared, "Content-Length")
            if size > self.max_body:
                raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {self.max_body}")
            self._hold(request, size)  # reserve it all now: refused before a byte is read
            reserved = size
        else:
            reserved = 0
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(f"body exceeds the limit of {self.max_body} bytes")
                if size > reserved:
                    self._hold(request, size - reserved)
                    reserved = size
                chunks.append(chunk)
        except ClientDisconnect:
            self.metrics.rejected.labels("cancelled").inc()
            raise Cancelled("client disconnected during the upload") from None
        body = b"".join(chunks)
        if tracing.ENABLED:
            tracing.stage("read body", began, bytes=len(body))
        request._body = body  # Starlette's own cache: request.form()/json() read it instead of the spent stream
        return body

    def deadline(self, request: Request) -> float | None:
        return self.core.deadline(timeout_from_header(request.headers.get(TIMEOUT_HEADER)))


def timeout_from_header(raw: str | None) -> float | None:
    """The X-Request-Timeout-Ms header's value in seconds (None: no header); InvalidParameter
    unless it is a positive number of milliseconds in plain ASCII digits."""
    if raw is None:
        return None
    ms = parse_decimal(raw, f"{TIMEOUT_HEADER} (milliseconds)", InvalidParameter)
    if not ms > 0:
        raise InvalidParameter(f"{TIMEOUT_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return ms / 1000.0


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
