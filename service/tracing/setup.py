"""OpenTelemetry set-up for one process, the standard way: every ``OTEL_*`` variable the SDK and
the OTLP exporters read (endpoint, headers, timeout, protocol, sampler and ratio, resource
attributes, batch processor sizes) works as documented; cnnserve only picks defaults where the
SDK has none that suits a server:

- exporter: ``OTEL_TRACES_EXPORTER`` otlp (default), console or none; protocol from
  ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: http/protobuf
  (the specification's default) or grpc.
- sampler: ``OTEL_TRACES_SAMPLER`` as the SDK reads it; unset, parent-based trace-id ratio with
  ``OTEL_TRACES_SAMPLER_ARG`` (default 0.01 here): a sampled parent from a client or a mesh is
  always traced, an unsampled one never, and 1 % of the rest.
- propagators: ``OTEL_PROPAGATORS`` as the SDK reads it; unset, W3C trace context and baggage
  plus B3 (single or multi header), W3C winning when a request carries both.
- export through a batch processor with a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``): a slow or
  broken collector costs a worker thread's time, never a request's; spans that do not fit, or
  whose export fails, are counted in ``cnnserve_trace_spans_dropped_total{reason}``.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Sequence
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter

from service.settings import Settings

log = logging.getLogger("cnnserve.tracing")
DEFAULT_RATIO = 0.01
SHUTDOWN_TIMEOUT_MS = 2000  # at exit, a collector that does not answer delays the stop this long at most


class _NoCounter:
    def labels(self, *_: str) -> _NoCounter:
        return self

    def inc(self, _: float = 1) -> None: ...


class CountingExporter(SpanExporter):
    """The real exporter, with the spans of every failed export counted as dropped."""

    def __init__(self, inner: SpanExporter, dropped: Any) -> None:
        self.inner, self.dropped = inner, dropped

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not kill the processor's thread
            log.exception("span export failed")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.dropped.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """BatchSpanProcessor whose queue-full drops are counted (the SDK only logs them)."""

    def __init__(self, exporter: SpanExporter, dropped: Any) -> None:
        super().__init__(exporter)
        self.dropped = dropped
        inner = getattr(self, "_batch_processor", None)
        # The SDK's queue and its bound; if a later SDK renames them, drops go uncounted, not wrong.
        self._queue = getattr(inner, "_queue", None)
        self._max = getattr(inner, "_max_queue_size", 0)

    def close(self, timeout_ms: int) -> None:
        """Export what is queued, waiting ``timeout_ms`` at most (BatchSpanProcessor.shutdown waits 30 s)."""
        inner = getattr(self, "_batch_processor", None)
        if inner is not None:
            inner.shutdown(timeout_millis=timeout_ms)
        else:
            self.shutdown()  # type: ignore[no-untyped-call]  # the SDK's BatchSpanProcessor.shutdown is untyped

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self._queue is not None and len(self._queue) >= self._max:
            self.dropped.labels("queue_full").inc()
        super().on_end(span)


def _exporter() -> SpanExporter | None:
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER={kind!r}: cnnserve supports otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    ) or "http/protobuf"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTLP protocol {protocol!r}: cnnserve supports grpc or http/protobuf")


def _root_ratio() -> float | None:
    """The ratio of requests without a parent to trace, decided by service.tracing.spans before
    any span exists; None when OTEL_TRACES_SAMPLER names a sampler, which the SDK then runs."""
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    raw = os.environ.get("OTEL_TRACES_SAMPLER_ARG")
    ratio = DEFAULT_RATIO if raw is None else float(raw)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={raw!r}: a ratio from 0 to 1")
    return ratio


def _propagator() -> Any:
    if os.environ.get("OTEL_PROPAGATORS"):
        return propagate.get_global_textmap()
    from opentelemetry.baggage.propagation import W3CBaggagePropagator

    # Extracted in order, each over the last: W3C last, so it wins over B3 when both are sent.
    return CompositePropagator([B3MultiFormat(), TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _resource(process: str) -> Resource:
    resource = Resource.create({"cnnserve.process": process})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "cnnserve"}))
    return resource


def configure(settings: Settings, process: str, registry: CollectorRegistry | None) -> None:
    from service.tracing import spans

    dropped: Any = (
        Counter("cnnserve_trace_spans_dropped", "Spans not exported, by reason.", ["reason"], registry=registry)
        if registry is not None
        else _NoCounter()
    )
    ratio = _root_ratio()
    # With our ratio the roots are decided before a span exists; what reaches the SDK is traced
    # (parent-based: a stage or batch span follows its request's decision).
    sampler = None if ratio is None else ParentBased(ALWAYS_ON)  # None: the SDK's, from OTEL_TRACES_SAMPLER
    provider = TracerProvider(resource=_resource(process), shutdown_on_exit=False, sampler=sampler)
    exporter = _exporter()
    processor = None
    if exporter is not None:
        processor = CountingBatchProcessor(CountingExporter(exporter, dropped), dropped)
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    propagator = _propagator()
    propagate.set_global_textmap(propagator)
    spans.install(provider.get_tracer("cnnserve"), propagator, ratio)
    _trace_ids_in_logs()
    if processor is not None:
        atexit.register(processor.close, SHUTDOWN_TIMEOUT_MS)
    root = f"parent-based, {ratio:g} of requests without a parent" if ratio is not None else "from OTEL_TRACES_SAMPLER"
    log.info("tracing on: %s, sampler %s", type(exporter).__module__ if exporter else "no exporter",
             root if ratio is not None else provider.sampler.get_description())  # fmt: skip


class _TraceIds(logging.Filter):
    """Puts the current trace and span ids on every log record (empty outside a sampled request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.trace_flags.sampled:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class _TraceSuffix(logging.Formatter):
    """The handler's own format, with `` trace_id=…`` after a sampled request's lines (text logs)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} trace_id={trace_id}" if trace_id else line


def _trace_ids_in_logs() -> None:
    from service.logs import JsonFormatter

    for handler in logging.getLogger().handlers:
        handler.addFilter(_TraceIds())
        formatter = handler.formatter or logging.Formatter()
        if not isinstance(formatter, JsonFormatter):  # the JSON formatter writes the ids as fields itself
            handler.setFormatter(_TraceSuffix(formatter))
