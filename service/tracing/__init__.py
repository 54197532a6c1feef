"""OpenTelemetry tracing, off unless ``--tracing`` (``CNNSERVE_TRACING=1``).

This module is what the request path imports: a flag and thin functions. It never imports
OpenTelemetry itself; ``start()`` does, once, when tracing is on (``service.tracing.setup``), so a
server without tracing pays one attribute test per hook and nothing else (OpenTelemetry is the
optional ``tracing`` extra and need not even be installed). Every hook reads

    if tracing.ENABLED:
        tracing.event("decoded", images=n)

and the functions below are only called behind that test. ``service.tracing.spans`` holds the
work they hand over to.

Across the front end → executor hop the context travels in a side message (``MSG_TRACE``), not
in the 20-byte SUBMIT record: one 29-byte record (request id, trace id, span id, flags) per
*sampled* request, sent just before the SUBMIT message on the same SOCK_SEQPACKET socket (so it
arrives first). The executor keeps them in a small per-front-end table keyed by request id and
looks up each batch's requests there; unsampled requests cost nothing on the hop.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import grpc
    from prometheus_client import CollectorRegistry
    from starlette.requests import Request

    from service.settings import Settings

T = TypeVar("T")

#: Set once by start(); every hook tests it first. False: no OpenTelemetry object ever exists.
ENABLED = False
#: The span of the request this task (or thread, via in_context) works for, while it is sampled:
#: the hooks below test it before anything else, so an untraced request never reaches OpenTelemetry.
CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("cnnserve_request_span", default=None)
#: Kind byte of the side message that carries sampled requests' contexts to a device executor.
MSG_TRACE = b"T"


def start(settings: Settings, process: str, registry: CollectorRegistry | None = None) -> None:
    """Configure tracing for this process (``process``: server, frontend-N, executor-N) if the
    settings ask for it; spans dropped are counted in ``registry``."""
    global ENABLED
    if not settings.tracing or ENABLED:
        return
    try:
        from service.tracing import setup
    except ImportError as e:  # one line naming the fix, not a traceback
        raise SystemExit(f"--tracing needs the tracing extra (pip install 'cnnserve[tracing]'): {e}") from None
    setup.configure(settings, process, registry)
    ENABLED = True


def traced_http(method: str, request: Request, work: Awaitable[T]) -> Awaitable[T]:
    """``work`` (a route's coroutine) run inside a server span whose parent comes from the
    request's headers (W3C traceparent or B3)."""
    from service.tracing import spans

    return spans.traced_http(method, request, work)


def traced_grpc(method: str, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> Awaitable[T]:
    """``work`` (an RPC's coroutine) run inside a server span whose parent comes from the call's
    metadata."""
    from service.tracing import spans

    return spans.traced_grpc(method, context, work)


def event(name: str, **attributes: Any) -> None:
    """A stage event on the current request's span (nothing if it is not sampled)."""
    span = CURRENT.get()
    if span is not None:
        span.add_event(name, {f"cnnserve.{k}": v for k, v in attributes.items()})


def annotate(**attributes: Any) -> None:
    """Attributes on the current request's span (nothing if it is not sampled)."""
    span = CURRENT.get()
    if span is not None:
        span.set_attributes({f"cnnserve.{k}": v for k, v in attributes.items() if v is not None})


def current() -> Any:
    """The current request's span if it is sampled, else None: what a batcher keeps per request."""
    return CURRENT.get()


def batch_done(name: str, requests: list[tuple[Any, float, int]], started: float, elapsed: float, size: int) -> None:
    """One computed batch of the in-process batcher: ``requests`` are (span or None, enqueued, images
    in this batch) with ``time.monotonic()`` instants."""
    from service.tracing import spans

    spans.batch_done(name, requests, started, elapsed, size)


def hop_record(request: int) -> bytes | None:
    """The side-table record that carries the current request's context to the executor, or
    None when the request is not sampled."""
    if CURRENT.get() is None:
        return None
    from service.tracing import hop

    return hop.record(request)


def hop_receive(table: dict[int, Any], data: bytes) -> None:
    """In the executor: remember the contexts of a ``MSG_TRACE`` message in a front end's table."""
    from service.tracing import hop

    hop.receive(table, data)


def executor_batch(name: str, version: str, live: list[Any], started: float, elapsed: float, size: int) -> None:
    """In the executor: the compute span of one batch, linked to its sampled requests."""
    from service.tracing import hop

    hop.executor_batch(name, version, live, started, elapsed, size)


def stage(name: str, since: float, **attributes: Any) -> None:
    """A finished stage span of the current request, from ``since`` (``time.monotonic()``) to now."""
    if CURRENT.get() is None:
        return
    from service.tracing import spans

    spans.stage(name, since, attributes)


def in_context(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` to be run in another thread within the current context (the request's span)."""
    context = contextvars.copy_context()

    def run(*args: Any) -> T:
        return context.run(fn, *args)

    return run
