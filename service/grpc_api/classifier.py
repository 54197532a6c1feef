"""``cnnserve.v1.Classifier`` servicer: protobuf ↔ core, nothing else."""
from __future__ import annotations

import asyncio
import time

import grpc

from service.core import InferenceCore, RawImage
from service.errors import InvalidInput, ServiceError, grpc_status
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


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
            if e.reason not in ("queue_full", "deadline", "cancelled"):  # the batcher counted those
                self.metrics.rejected.labels(e.reason).inc()
            self.duration.observe(time.perf_counter() - started)
            await context.abort(code, e.message)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
            self.metrics.requests.labels("grpc", self.method, code.name).inc()
            raise
        self.ok.inc()
        self.duration.observe(time.perf_counter() - started)
        return response


def _images(request: pb.ClassifyRequest) -> list:
    images = []
    for i, image in enumerate(request.images):
        source = image.WhichOneof("source")
        if source == "encoded":
            images.append(image.encoded)
        elif source == "raw":
            images.append(RawImage(image.raw.pixels, image.raw.height, image.raw.width))
        else:
            raise InvalidInput(f"image {i} has neither encoded bytes nor raw pixels")
    return images


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, core: InferenceCore, metrics: Metrics) -> None:
        self.core = core
        self.instrumented = Instrumented(metrics, "Classify")

    async def _classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        result = await self.core.classify(
            _images(request), top_k=request.top_k if request.HasField("top_k") else None,
            model=request.model or None, version=request.model_version or None,
            deadline=self.core.deadline(context.time_remaining()))
        Prediction, Classification = pb.Prediction, pb.Classification
        results = [
            Classification(predictions=[Prediction(label=l, index=i, probability=p) for l, i, p in zip(ls, ix, ps)])
            for ls, ix, ps in zip(result.labels, result.indices, result.probabilities)
        ]
        return pb.ClassifyResponse(model=result.model, model_version=result.version, results=results)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self.instrumented(context, self._classify(request, context))
