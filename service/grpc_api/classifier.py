"""``cnnserve.v1.Classifier`` servicer: protobuf ↔ core and explainer, nothing else."""

from __future__ import annotations

import grpc

from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.grpc_api.instrumented import rpc
from service.inference.serving import ImageInput, RawImage
from service.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name


def _images(request: pb.ClassifyRequest | pb.ExplainRequest) -> list[ImageInput]:
    images: list[ImageInput] = []
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
    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane = plane
        self.core = plane.core
        self.metrics = metrics

    @rpc
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        held = request.ByteSize()
        self.plane.buffers.hold(held)  # the message is in memory until this call ends
        try:
            result = await self.core.classify(
                _images(request),
                top_k=request.top_k if request.HasField("top_k") else None,
                model=request.model or None,
                version=request.model_version or None,
                deadline=self.core.deadline(context.time_remaining()),
            )
        finally:
            self.plane.buffers.release(held)
        Prediction, Classification = pb.Prediction, pb.Classification
        results = [
            Classification(predictions=[Prediction(label=l, index=i, probability=p) for l, i, p in zip(ls, ix, ps)])
            for ls, ix, ps in zip(result.labels, result.indices, result.probabilities)
        ]
        return pb.ClassifyResponse(model=result.model, model_version=result.version, results=results)

    @rpc
    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext) -> pb.ExplainResponse:
        result = await self.plane.explainer.explain(
            _images(request),
            top_k=request.top_k if request.HasField("top_k") else None,
            model=request.model or None,
            version=request.model_version or None,
            target=request.target if request.HasField("target") else None,
            method=request.method or None,
            seed=request.seed,
            deadline=self.core.deadline(context.time_remaining()),
        )
        Prediction = pb.Prediction
        results = [
            pb.Explanation(
                predictions=[
                    Prediction(label=l, index=i, probability=p) for l, i, p in zip(r.labels, r.indices, r.probabilities)
                ],
                attribution=pb.Attribution(
                    method=r.method,
                    class_index=r.class_index,
                    label=r.label,
                    height=r.values.shape[0],
                    width=r.values.shape[1],
                    values=r.values.ravel().tolist(),
                ),
                layers=[pb.Layer(**layer) for layer in r.layers],
            )
            for r in result.results
        ]
        return pb.ExplainResponse(model=result.model, model_version=result.version, results=results)
