"""One gRPC method's bookkeeping: request metrics, domain errors turned into the call's status
(with a retry hint when overloaded), and requests that are not valid protobuf answered
INVALID_ARGUMENT instead of grpc's UNKNOWN plus a logged traceback."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what abort() raises on a call the core has ended

from service import tracing
from service.errors import Overloaded, ServiceError, grpc_status
from service.grpc_api.calls_per_client import CallsPerClient
from service.grpc_api.http2_limits import trim_heap_soon
from service.grpc_api.reset_budget import ResetBudget
from service.metrics import Metrics

log = logging.getLogger("cnnserve.grpc")

RETRY_PUSHBACK = "grpc-retry-pushback-ms"  # gRFC A6: how long a client's retry policy should wait
Req = TypeVar("Req")
Resp = TypeVar("Resp")
#: A servicer's async RPC method (self, request, context).
RpcMethod = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]
UNTRACED = frozenset({"ModelReady"})  # readiness probes, like HTTP's, make no traces


class Instrumented:
    """Records cnnserve_requests_total / _request_duration_seconds for one gRPC method and turns
    domain errors into the call's status (anything else: INTERNAL, logged)."""

    def __init__(self, metrics: Metrics, method: str) -> None:
        self.metrics = metrics
        self.method = method
        self.duration = metrics.request_duration.labels("grpc", method)
        self.ok = metrics.requests.labels("grpc", method, "OK")

    def succeeded(self, started: float) -> None:
        self.ok.inc()
        self.duration.observe(time.perf_counter() - started)

    async def failed(self, context: grpc.aio.ServicerContext, e: ServiceError, started: float) -> None:
        code = grpc_status(e)
        self.metrics.requests.labels("grpc", self.method, code.name).inc()
        if not e.counted_by_batcher:
            self.metrics.rejected.labels(e.reason).inc()
        self.duration.observe(time.perf_counter() - started)
        trailers: tuple[tuple[str, str], ...] = ()
        if isinstance(e, Overloaded):
            trailers = ((RETRY_PUSHBACK, str(max(1, math.ceil(e.retry_after_s * 1000)))),)
        await _end_call(context, code, e.message, trailers)

    async def unexpected(self, context: grpc.aio.ServicerContext, e: Exception, started: float) -> None:
        # grpc would answer UNKNOWN and count nothing; counted, the error-ratio alert sees it.
        log.exception("%s failed unexpectedly", self.method)
        self.metrics.requests.labels("grpc", self.method, grpc.StatusCode.INTERNAL.name).inc()
        self.duration.observe(time.perf_counter() - started)
        await _end_call(context, grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")

    def cancelled(self, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        code = (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )
        self.metrics.requests.labels("grpc", self.method, code.name).inc()


async def _end_call(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()
) -> NoReturn:
    """``context.abort``, for a call grpc-core may already have ended: its deadline passes in the
    core while the handler is still deciding (decoding, queued), so the status has nowhere to go
    and grpc would log "ExecuteBatchError raised in core" with two tracebacks at ERROR. Such a call
    ends as cancelled instead (grpc logs that at DEBUG); the client has its DEADLINE_EXCEEDED."""
    try:
        await context.abort(code, message, trailing_metadata=trailers)
    except ExecuteBatchError:
        raise asyncio.CancelledError from None
    raise AssertionError("abort() raises")  # for the type checker: grpc's stubs do not say so


def rpc(method: RpcMethod[Req, Resp]) -> RpcMethod[Req, Resp]:
    """Decorate a servicer's async RPC method (on an object with a ``metrics`` attribute): its
    metrics are recorded under the method's name and domain errors become the call's status.
    One coroutine per call: the method's own is awaited inside it (or inside the tracing span's,
    only when tracing is on)."""
    name = method.__name__
    traced = name not in UNTRACED

    @functools.wraps(method)
    async def handler(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        instruments: dict[str, Instrumented] = self.__dict__.setdefault("_instruments", {})
        instrumented = instruments.get(name)
        if instrumented is None:
            instrumented = instruments[name] = Instrumented(self.metrics, name)
        started = time.perf_counter()
        try:
            if tracing.ENABLED and traced:
                response = await tracing.traced_grpc(name, context, method(self, request, context))
            else:
                response = await method(self, request, context)
        except ServiceError as e:
            await instrumented.failed(context, e, started)
            raise  # not reached: abort() raises
        except asyncio.CancelledError:
            instrumented.cancelled(context)
            raise
        except grpc.aio.AbortError:  # the handler ended the call itself, having counted it
            raise
        except Exception as e:  # noqa: BLE001 - a bug or a broken model file: INTERNAL, counted
            await instrumented.unexpected(context, e, started)
            raise  # not reached: abort() raises
        instrumented.succeeded(started)
        return response

    return handler


class _Malformed:
    """What a request that failed to deserialize becomes, so its handler can refuse it cleanly."""

    __slots__ = ("code", "error")

    def __init__(self, error: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        self.error = error
        self.code = code


# grpc-core would inflate a compressed message whole before comparing it with
# grpc.max_receive_message_length (1 MB on the wire inflating to 1 GiB: seconds, GBs), so the server
# runs with per-message decompression off (service/grpc_api/http2_limits.py) and such a message
# reaches us as it came. None of the clients we serve (our own, tritonclient, perf_analyzer,
# grpcurl) compresses unless asked to. gRPC's answer to an encoding a server does not take:
# UNIMPLEMENTED, naming the one it does (the message cannot say so in grpc-accept-encoding here).
PENALTY_BOX = "this client address cancelled too many calls before sending them (HTTP/2 rapid reset): try later"
COMPRESSED = "compressed requests are not accepted (grpc-encoding gzip/deflate): send them uncompressed (identity)"


def malformed(request: object) -> str | None:
    """What is wrong with a message that failed to deserialize (None: it is a message): a unary
    call is refused with it (by the guard), a streamed request answered with it."""
    if type(request) is not _Malformed:
        return None
    if request.code is not grpc.StatusCode.INVALID_ARGUMENT:
        return request.error
    return f"request is not a valid message: {request.error}"


def _looks_compressed(data: bytes) -> bool:
    """gzip's magic, or a zlib header (gRPC's "deflate"): neither can start a valid protobuf
    message that failed to parse anyway, so this only names the error better."""
    if data[:2] == b"\x1f\x8b":
        return True
    return len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:
            if _looks_compressed(data):
                return _Malformed(COMPRESSED, grpc.StatusCode.UNIMPLEMENTED)
            return _Malformed(f"{type(e).__name__}: {e}")

    return safe


async def _refuse(
    context: grpc.aio.ServicerContext, metrics: Metrics, name: str, code: grpc.StatusCode, reason: str, message: str
) -> NoReturn:
    """Count the call (by code) and the refusal (by reason), then end it with ``code``."""
    metrics.requests.labels("grpc", name, code.name).inc()
    metrics.rejected.labels(reason).inc()
    await _end_call(context, code, message)


#: How close to its deadline a cancelled call counts as ended by it: the client's clock starts the
#: deadline a network trip before the server's does.
DEADLINE_SLACK_S = 0.01


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """A call cancelled at its deadline is a client giving up, not a reset: under load a short
    deadline passes before the handler reads the message (16 callers at 2-8 ms had their connection
    shut down as rapid resetters, UNAVAILABLE on every call on it). A resetter that sets such
    deadlines is left to grpc-core's stream bound (http2_limits.py), like any flood of calls."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


async def _first_message(
    context: grpc.aio.ServicerContext,
    metrics: Metrics,
    name: str,
    timeout: float | None,
    resets: ResetBudget | None,
) -> Any:
    """The call's request message, or the call ended with DEADLINE_EXCEEDED when it has not
    arrived ``timeout`` seconds after the call's headers (a stream opened with headers only would
    otherwise hold a call slot until the client leaves)."""
    task = asyncio.current_task()
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        if task is not None:
            task.cancel()

    timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, expire)
    try:
        request = await context.read()
    except asyncio.CancelledError:
        if not expired:
            if resets is not None and not _deadline_passed(context):  # cancelled before its message: rapid reset?
                resets.note(context.peer())
            raise
        if task is not None and hasattr(task, "uncancel"):  # Python 3.11+: the cancel was ours, handled
            task.uncancel()
        request = None
    finally:
        if timer is not None:
            timer.cancel()
    if expired:
        trim_heap_soon()  # the stalled message may have been large (grpc-core buffers it whole)
        await _refuse(
            context,
            metrics,
            name,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "deadline",
            f"request message not received within {timeout:g} s of the call's headers",
        )
    if request is grpc.aio.EOF:
        await _refuse(
            context,
            metrics,
            name,
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid",
            "the call ended without a request message",
        )
    return request


def _guarded(
    handler: grpc.RpcMethodHandler,
    metrics: Metrics,
    method: str,
    message_timeout: float | None,
    resets: ResetBudget | None = None,
    calls: CallsPerClient | None = None,
) -> grpc.RpcMethodHandler:
    """The same unary-unary async handler, served as a client-streaming one (the same bytes on the
    wire: a unary call is a stream of one message) so that it runs from the call's headers: a
    client address at its cap of calls in progress is refused RESOURCE_EXHAUSTED, the first
    message is awaited under ``message_timeout``, compressed requests are refused before they
    inflate, and what does not parse is answered INVALID_ARGUMENT (the deserializer cannot raise).
    Other kinds are returned as they are."""
    name = method.rsplit("/", 1)[-1]
    per_client = calls or CallsPerClient(0)
    busy = f"server busy: {per_client.cap} calls in progress from your address (--grpc-max-calls-per-client)"
    if handler.request_streaming and handler.response_streaming and handler.stream_stream is not None:
        return _guarded_stream(handler, metrics, name, resets, per_client, busy)
    behavior = handler.unary_unary
    if behavior is None or handler.request_streaming or not inspect.iscoroutinefunction(behavior):
        return handler

    async def checked(request_iterator: AsyncIterator[object], context: grpc.aio.ServicerContext) -> object:
        address = await _admit(context, metrics, name, resets, per_client, busy)
        try:
            request = await _first_message(context, metrics, name, message_timeout, resets)
            problem = malformed(request)
            if problem is not None:
                await _refuse(context, metrics, name, request.code, "invalid", problem)
            return await behavior(request, context)
        finally:
            per_client.release(address)

    return grpc.stream_unary_rpc_method_handler(
        checked,
        request_deserializer=_safe_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


async def _admit(
    context: grpc.aio.ServicerContext,
    metrics: Metrics,
    name: str,
    resets: ResetBudget | None,
    per_client: CallsPerClient,
    busy: str,
) -> str:
    """A new call's client address, counted against its cap (``per_client.release`` it); a call
    from a boxed address (its connection is shut down already) or one at its cap is refused."""
    if resets is not None and resets.refuses(context.peer):
        await _refuse(context, metrics, name, grpc.StatusCode.UNAVAILABLE, "penalty_box", PENALTY_BOX)
    address = per_client.admit(context.peer)
    if address is None:
        await _refuse(context, metrics, name, grpc.StatusCode.RESOURCE_EXHAUSTED, "per_client", busy)
    return address


def _guarded_stream(
    handler: grpc.RpcMethodHandler,
    metrics: Metrics,
    name: str,
    resets: ResetBudget | None,
    per_client: CallsPerClient,
    busy: str,
) -> grpc.RpcMethodHandler:
    """A bidirectional method (ModelStreamInfer): refused from a boxed address or one at its cap of
    calls in progress, as a unary call is; its messages deserialize to ``_Malformed`` instead of
    failing the call (the handler answers each one, ``malformed``). A stream may wait for its next
    message as long as the client likes: no message timeout."""
    behavior = handler.stream_stream

    async def checked(request_iterator: AsyncIterator[object], context: grpc.aio.ServicerContext) -> None:
        address = await _admit(context, metrics, name, resets, per_client, busy)
        try:
            await behavior(request_iterator, context)
        finally:
            per_client.release(address)

    return grpc.stream_stream_rpc_method_handler(
        checked,
        request_deserializer=_safe_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, wrap: Callable[[grpc.RpcMethodHandler, str], Any]) -> None:
        self.inner = inner
        self.wrap = wrap
        self.cache: dict[str, Any] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if method not in self.cache:
            found = self.inner.service(handler_call_details)
            self.cache[method] = None if found is None else self.wrap(found, method)
        return self.cache[method]


class GuardedRegistration:
    """Stands in for the grpc.aio server while generated ``add_*_to_server`` functions register a
    service, so that every unary method of it is guarded (``_guarded``): malformed requests get
    INVALID_ARGUMENT, compressed ones UNIMPLEMENTED, a message that does not come within
    ``message_timeout`` DEADLINE_EXCEEDED, calls cancelled before their message are reported
    to ``resets`` (service/grpc_api/reset_budget.py), which refuses calls from an address in its
    penalty box, and calls from an address past ``calls``' cap are refused RESOURCE_EXHAUSTED
    (service/grpc_api/calls_per_client.py). A call costs one timer, a type test and a count."""

    def __init__(
        self,
        server: grpc.aio.Server,
        metrics: Metrics,
        message_timeout: float | None = None,
        resets: ResetBudget | None = None,
        calls: CallsPerClient | None = None,
    ) -> None:
        self.server = server
        self.wrap = functools.partial(_guarded_as_registered, metrics, message_timeout, resets, calls)

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GuardedGenericHandler(h, self.wrap) for h in handlers))

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Any]) -> None:
        self.server.add_registered_method_handlers(
            service, {m: self.wrap(h, f"/{service}/{m}") for m, h in method_handlers.items()}
        )


def _guarded_as_registered(
    metrics: Metrics,
    message_timeout: float | None,
    resets: ResetBudget | None,
    calls: CallsPerClient | None,
    handler: grpc.RpcMethodHandler,
    method: str,
) -> grpc.RpcMethodHandler:
    return _guarded(handler, metrics, method, message_timeout, resets, calls)
