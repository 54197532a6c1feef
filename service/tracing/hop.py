"""The front end → device executor hop: sampled requests' contexts in a side table.

The SUBMIT record stays 20 bytes and carries no context (tracing off, or a request not sampled,
costs the hop nothing). For each sampled request the front end appends one ``RECORD`` (request
id, trace id, parent span id, flags) to a ``MSG_TRACE`` message that it sends just before the
SUBMIT message of the same loop iteration, on the same SOCK_SEQPACKET socket, so it arrives
first. The executor's I/O thread puts them in its table for that front end (request id →
context); the compute thread reads the table for each batch's requests. Entries are not removed
on completion (a request may be split over batches): the table keeps the newest ``TABLE_SIZE``,
far more than can be in flight when 1 % are sampled, and request ids wrap only after 2**32.
"""

from __future__ import annotations

import struct
from typing import Any

from opentelemetry import trace

from service.tracing import spans

RECORD = struct.Struct("<I16sQB")  # request id, trace id (big-endian bytes), span id, trace flags
TABLE_SIZE = 4096


def record(request: int) -> bytes | None:
    context = trace.get_current_span().get_span_context()
    if not context.trace_flags.sampled:
        return None
    return RECORD.pack(request, context.trace_id.to_bytes(16, "big"), context.span_id, int(context.trace_flags))


def receive(table: dict[int, trace.SpanContext], data: bytes) -> None:
    """Called with a ``MSG_TRACE`` message's payload (after the kind byte)."""
    for request, trace_id, span_id, flags in RECORD.iter_unpack(data):
        table[request] = trace.SpanContext(
            int.from_bytes(trace_id, "big"), span_id, is_remote=True, trace_flags=trace.TraceFlags(flags)
        )
    while len(table) > TABLE_SIZE:
        del table[next(iter(table))]  # the oldest: dicts keep insertion order


def executor_batch(name: str, version: str, live: list[Any], started: float, elapsed: float, size: int) -> None:
    """``live``: the batch's (chunk, mask of live records, statuses), as the executor keeps them;
    a chunk has ``frontend.traces`` (this table), ``records`` (SUBMIT) and ``arrived``."""
    found: list[tuple[trace.SpanContext, float, int]] = []
    for chunk, mask, _ in live:
        table = chunk.frontend.traces
        if not table:
            continue
        counts: dict[int, int] = {}
        for request in chunk.records["request"][mask].tolist():  # a dict lookup per image: cheap
            if request in table:
                counts[request] = counts.get(request, 0) + 1
        for request, n in counts.items():
            context = table.get(request)  # get: the I/O thread may have evicted it since
            if context is not None:
                found.append((context, chunk.arrived, n))
    if not found:
        return
    requests = sum(int((chunk.records["index"][mask] == 0).sum()) for chunk, mask, _ in live)
    spans.compute_span(f"{name}-{version}", [c for c, _, _ in found], started, elapsed, size, requests,
                       process="executor")  # fmt: skip
    for context, arrived, n in found:
        spans.queue_span(context, arrived, started, n, size)
