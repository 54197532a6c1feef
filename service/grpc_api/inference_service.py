"""Open Inference Protocol (KServe v2) gRPC binding, ``inference.GRPCInferenceService``, on
tritonclient's generated stubs: protobuf ↔ ``service.protocol.open_inference``, nothing else.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelStreamInfer (``stream_infer``), ModelConfig, ModelStatistics, RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload (``service.protocol.model_repository``). The other RPCs
(shared memory, trace, logging) answer UNIMPLEMENTED. Errors are mapped by ``Instrumented``, which
also records ``cnnserve_requests_total{protocol="grpc",method=<RPC>,code}``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.dataplane import DataPlane
from service.grpc_api import stream_infer
from service.grpc_api.instrumented import rpc
from service.grpc_api.v2_messages import parameters, request_from_proto, response_to_proto
from service.metrics import Metrics
from service.protocol import metadata
from service.protocol import model_repository as repository
from service.protocol import open_inference as v2

SERVICE_NAME = "inference.GRPCInferenceService"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane, metrics: Metrics) -> None:
        self.plane = plane
        self.metrics = metrics

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.readiness.is_ready)

    @rpc
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=metadata.model_ready(self.plane, request.name, request.version))

    @rpc
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(metadata.server_metadata(), pb.ServerMetadataResponse())

    @rpc
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        return json_format.ParseDict(
            metadata.model_metadata(self.plane, request.name, request.version), pb.ModelMetadataResponse()
        )

    @rpc
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        config = json_format.ParseDict(
            metadata.model_config(self.plane, request.name, request.version), mc.ModelConfig()
        )
        return pb.ModelConfigResponse(config=config)

    @rpc
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        return json_format.ParseDict(
            metadata.model_statistics(self.plane, request.name, request.version), pb.ModelStatisticsResponse()
        )

    @rpc
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        models = repository.index(self.plane, request.ready)
        return json_format.ParseDict({"models": models}, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        await repository.load(self.plane, request.model_name, parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await repository.unload(self.plane, request.model_name, parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        held = request.ByteSize()
        self.plane.buffers.hold(held)  # the message is in memory until this call ends
        try:
            parsed = request_from_proto(request)
            result = await v2.infer(self.plane, parsed, self.plane.core.deadline(context.time_remaining()))
        finally:
            self.plane.buffers.release(held)
        return response_to_proto(result)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        await stream_infer.serve(self.plane, self.metrics, context)


def add_to_server(plane: DataPlane, metrics: Metrics, server: grpc.aio.Server) -> InferenceServicer:
    servicer = InferenceServicer(plane, metrics)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    return servicer


def _unimplemented(method: str) -> Callable[[InferenceServicer, object, grpc.aio.ServicerContext], Awaitable[None]]:
    async def handler(self: InferenceServicer, request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{SERVICE_NAME}/{method} is not implemented by cnnserve")

    handler.__name__ = handler.__qualname__ = method
    return handler


# The base servicer's defaults are blocking methods that raise (logged as errors, run in a thread);
# answer UNIMPLEMENTED cleanly instead.
for _method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name:
    if _method not in InferenceServicer.__dict__:
        setattr(InferenceServicer, _method, _unimplemented(_method))
del _method
