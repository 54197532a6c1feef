"""The spans of one process: a server span per traced request (HTTP or gRPC), its stage spans and
events, and the in-process batcher's queue and compute spans. Only reached when tracing is on.

A request that is not traced gets no span object at all (with cnnserve's default sampler; see
``_decide``): its work runs as it would without tracing, and every later hook finds
``tracing.CURRENT`` empty and returns.

Stages of a traced request (children of its server span): ``read body`` (HTTP), ``decode``,
``queue`` (enqueued → its batch starts), ``compute`` (the batch: one span per batch, a child of
the first sampled request it served and linked to every sampled request in it), ``answer``
(results back → response ready: top-k, serialisation). Events: ``admitted``, ``computed``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from starlette.requests import Request

from service.errors import ServiceError, grpc_status, http_status
from service.tracing import CURRENT

T = TypeVar("T")
REQUEST_ID = "x-request-id"  # set by most ingresses and meshes: the id their logs carry
_tracer: trace.Tracer = trace.NoOpTracer()
_propagator: Any = None
_fields: frozenset[str] = frozenset()  # the headers the propagators read, lower case
_fields_bytes: frozenset[bytes] = frozenset()
_root_ratio: float | None = None


def install(tracer: trace.Tracer, propagator: Any, root_ratio: float | None) -> None:
    """``root_ratio``: sample requests without a parent here, before any span object exists (None:
    a sampler set by OTEL_TRACES_SAMPLER decides every request through the SDK)."""
    global _tracer, _propagator, _fields, _fields_bytes, _root_ratio
    _tracer, _propagator, _root_ratio = tracer, propagator, root_ratio
    # B3MultiFormat reads the single `b3` header and x-b3-flags too, but does not list them.
    _fields = frozenset(f.lower() for f in propagator.fields) | {"b3", "x-b3-flags"}
    _fields_bytes = frozenset(f.encode("latin-1") for f in _fields)


def _decide(carrier: dict[str, str]) -> Context | None:
    """The parent context of a request to trace, or None when it is not traced. With cnnserve's
    default sampler an untraced request costs a scan of its headers and one random number: no
    extraction and no non-recording span from the SDK (together ~100 µs a request, measured)."""
    if _root_ratio is None:
        extracted: Context = _propagator.extract(carrier)
        return extracted
    if not carrier:
        return Context() if random.random() < _root_ratio else None
    parent = _propagator.extract(carrier)
    span_context = trace.get_current_span(parent).get_span_context()
    if span_context.is_valid:  # a propagated parent decides: sampled is always traced, unsampled never
        return parent if span_context.trace_flags.sampled else None
    return parent if random.random() < _root_ratio else None  # no valid parent (baggage only): a root


def epoch_ns(monotonic_s: float) -> int:
    """A ``time.monotonic()`` instant (how the server times stages) on the epoch clock spans use."""
    return time.time_ns() - time.monotonic_ns() + int(monotonic_s * 1e9)


async def _serve(span: Span, parent: Any, work: Awaitable[T], status_of: Any, error_of: Any) -> T:
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    marked = CURRENT.set(span)
    try:
        result = await work
        status_of(span, result)
        return result
    except ServiceError as e:
        error_of(span, e)
        raise
    except BaseException as e:  # cancelled (client gone, deadline), or a bug: recorded, then re-raised
        span.set_status(Status(StatusCode.ERROR, type(e).__name__))
        raise
    finally:
        _answer(span)
        CURRENT.reset(marked)
        otel_context.detach(token)
        span.end()


def _answer(span: Any) -> None:
    """The ``answer`` stage: from the ``computed`` event (results back) to now."""
    for e in reversed(getattr(span, "events", ())):
        if e.name == "computed":
            _tracer.start_span("answer", trace.set_span_in_context(span), start_time=e.timestamp).end()
            return


def traced_http(method: str, request: Request, work: Awaitable[T]) -> Awaitable[T]:
    parent = _decide({k.decode("latin-1"): v.decode("latin-1") for k, v in request.scope["headers"]
                      if k in _fields_bytes})  # fmt: skip
    if parent is None:
        return work
    route = request.scope.get("route")
    path = getattr(route, "path", None) or request.url.path
    span = _tracer.start_span(f"{request.method} {path}", parent, kind=SpanKind.SERVER)
    if not span.is_recording():
        return work
    span.set_attributes({"http.request.method": request.method, "http.route": path, "cnnserve.method": method})
    request_id = request.headers.get(REQUEST_ID)
    if request_id:
        span.set_attribute("cnnserve.request_id", request_id)
    return _serve(span, parent, work, _http_status, _http_error)


def _http_status(span: Span, response: Any) -> None:
    code = int(getattr(response, "status_code", 200))
    span.set_attribute("http.response.status_code", code)
    if code >= 500:
        span.set_status(Status(StatusCode.ERROR))


def _http_error(span: Span, error: ServiceError) -> None:
    code = http_status(error)
    span.set_attribute("http.response.status_code", code)
    span.set_attribute("error.type", error.reason)
    if code >= 500:
        span.set_status(Status(StatusCode.ERROR, error.message))


def traced_grpc(method: str, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> Awaitable[T]:
    metadata = context.invocation_metadata() or ()
    parent = _decide({k: v for k, v in metadata if k in _fields and isinstance(v, str)})
    if parent is None:
        return work
    span = _tracer.start_span(method, parent, kind=SpanKind.SERVER)
    if not span.is_recording():
        return work
    span.set_attributes({"rpc.system": "grpc", "rpc.method": method, "cnnserve.method": method})
    request_id = next((v for k, v in metadata if k == REQUEST_ID), None)
    if request_id:
        span.set_attribute("cnnserve.request_id", request_id)
    return _serve(span, parent, work, _grpc_ok, _grpc_error)


def _grpc_ok(span: Span, _: Any) -> None:
    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])


def _grpc_error(span: Span, error: ServiceError) -> None:
    code = grpc_status(error)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    span.set_attribute("error.type", error.reason)
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN):
        span.set_status(Status(StatusCode.ERROR, error.message))


def stage(name: str, since: float, attributes: Mapping[str, Any]) -> None:
    """A finished stage span, from ``since`` (``time.monotonic()``) to now, under the current span."""
    if trace.get_current_span().is_recording():
        span = _tracer.start_span(name, start_time=epoch_ns(since))
        span.set_attributes({f"cnnserve.{k}": v for k, v in attributes.items()})
        span.end()


def batch_done(name: str, requests: list[tuple[Any, float, int]], started: float, elapsed: float, size: int) -> None:
    """The compute span of one batch of the in-process batcher and each sampled request's queue span."""
    sampled = [(span, enqueued, n) for span, enqueued, n in requests if span is not None]
    if not sampled:
        return
    compute_span(name, [s.get_span_context() for s, _, _ in sampled], started, elapsed, size, len(requests))
    for span, enqueued, n in sampled:
        queue_span(span.get_span_context(), enqueued, started, n, size)


def compute_span(queue: str, parents: list[trace.SpanContext], started: float, elapsed: float, size: int,
                 requests: int, **attributes: Any) -> trace.SpanContext:  # fmt: skip
    """One batch's compute span: a child of the first sampled request it served, linked to them all
    (a batch serves many requests, often of many traces)."""
    parent = trace.set_span_in_context(trace.NonRecordingSpan(parents[0]))
    # "queue": the model version's batch queue (name-version), in the batcher or the executor
    span = _tracer.start_span(
        "compute",
        parent,
        links=[Link(p) for p in parents],
        start_time=epoch_ns(started),
        attributes={
            "cnnserve.queue": queue,
            "cnnserve.batch.size": size,
            "cnnserve.batch.requests": requests,
            **{f"cnnserve.{k}": v for k, v in attributes.items()},
        },
    )
    span.end(epoch_ns(started + elapsed))
    return span.get_span_context()


def queue_span(parent: trace.SpanContext, enqueued: float, started: float, images: int, size: int) -> None:
    """A request's wait for its batch, with its share of the batch."""
    span = _tracer.start_span(
        "queue",
        trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        start_time=epoch_ns(enqueued),
        attributes={"cnnserve.images": images, "cnnserve.batch.size": size, "cnnserve.batch.share": images / size},
    )
    span.end(epoch_ns(started))
