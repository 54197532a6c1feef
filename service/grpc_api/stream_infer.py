"""Triton's streaming inference, ``GRPCInferenceService/ModelStreamInfer`` (tritonclient's
``start_stream`` / ``async_stream_infer``, perf_analyzer ``--streaming``): many ModelInferRequests
on one bidirectional call, each answered by one ModelStreamInferResponse.

Why it earns its place: grpcio costs ~0.35-0.44 core-ms per call whatever the handler does
(docs/benchmarks.md, measured floors); a message on a call already open costs a fraction of that,
so a client that streams pays the call once.

As Triton does for a model that is not decoupled: requests are served concurrently, each answer is
written when it is ready (out of order; the response's ``id`` is the request's), and a request that
fails is answered with ``error_message`` (and its id) while the stream goes on. At most
``IN_FLIGHT`` requests of one stream are in progress; past it the stream is not read, so HTTP/2 flow
control holds the client back instead of this process buffering without bound. The stream's own
deadline, if any, is every request's. When the client half-closes, the requests in progress are
answered, then the call ends OK; when it cancels, they are cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc._cython.cygrpc import ExecuteBatchError  # what write() raises on a call the core has ended
from tritonclient.grpc import service_pb2 as pb

from service.dataplane import DataPlane
from service.errors import InvalidInput, ServiceError, grpc_status
from service.grpc_api.instrumented import malformed
from service.grpc_api.v2_messages import request_from_proto, response_to_proto
from service.metrics import Metrics
from service.protocol import open_inference as v2

log = logging.getLogger("cnnserve.grpc")
METHOD = "ModelStreamInfer"
#: Requests of one stream in progress at once: a batch's worth, so that one stream can fill the
#: batcher as 64 unary callers do (the default --max-batch-size).
IN_FLIGHT = 64


class _Recorder:
    """cnnserve_requests_total / _request_duration_seconds per request on the stream (label
    children resolved once per code)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.duration = metrics.request_duration.labels("grpc", METHOD)
        self.counters: dict[str, Any] = {}

    def record(self, code: str, started: float) -> None:
        counter = self.counters.get(code)
        if counter is None:
            counter = self.counters[code] = self.metrics.requests.labels("grpc", METHOD, code)
        counter.inc()
        self.duration.observe(time.perf_counter() - started)


async def serve(plane: DataPlane, metrics: Metrics, context: grpc.aio.ServicerContext) -> None:
    slots = asyncio.Semaphore(IN_FLIGHT)
    writing = asyncio.Lock()  # one write at a time on the call
    recorder = _Recorder(metrics)
    in_progress: set[asyncio.Task[None]] = set()

    async def answer(request: Any) -> None:
        started = time.perf_counter()
        try:
            try:
                reply, code = await _infer(plane, metrics, request, context.time_remaining())
            except Exception as e:  # noqa: BLE001 - a bug: this request answered INTERNAL, logged, counted
                log.exception("%s failed unexpectedly", METHOD)
                reply = pb.ModelStreamInferResponse(error_message=f"internal error: {type(e).__name__}")
                code = grpc.StatusCode.INTERNAL.name
            recorder.record(code, started)
            async with writing:
                await context.write(reply)
        except (ExecuteBatchError, grpc.aio.UsageError):
            pass  # the call ended under this request (client gone, deadline): nobody to answer
        finally:
            slots.release()

    try:
        while True:
            await slots.acquire()
            request = await context.read()
            if request is grpc.aio.EOF:  # the client half-closed: answer what it asked, then end
                break
            task = asyncio.ensure_future(answer(request))
            in_progress.add(task)
            task.add_done_callback(in_progress.discard)
        if in_progress:
            await asyncio.gather(*in_progress)
    finally:
        for task in in_progress:  # the client went away or the call was cancelled
            task.cancel()


async def _infer(
    plane: DataPlane, metrics: Metrics, request: Any, time_remaining: float | None
) -> tuple[pb.ModelStreamInferResponse, str]:
    """One request's answer on the stream and its status code's name (for the metrics)."""
    problem = malformed(request)
    if problem is not None:
        error: ServiceError = InvalidInput(problem)
        metrics.rejected.labels(error.reason).inc()
        return pb.ModelStreamInferResponse(error_message=error.message), grpc_status(error).name
    try:
        held = request.ByteSize()
        plane.buffers.hold(held)  # the message is in memory while it is served
        try:
            result = await v2.infer(plane, request_from_proto(request), plane.core.deadline(time_remaining))
        finally:
            plane.buffers.release(held)
    except ServiceError as e:
        if not e.counted_by_batcher:
            metrics.rejected.labels(e.reason).inc()
        failed = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return pb.ModelStreamInferResponse(error_message=e.message, infer_response=failed), grpc_status(e).name
    return pb.ModelStreamInferResponse(infer_response=response_to_proto(result)), "OK"
