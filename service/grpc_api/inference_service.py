"""Open Inference Protocol (KServe v2) gRPC binding, ``inference.GRPCInferenceService``, on
tritonclient's generated stubs: protobuf ↔ ``service.protocol.open_inference``, nothing else.

Implemented: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer,
ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload
(``service.protocol.model_repository``). The other RPCs (streaming, shared memory, trace, logging)
answer UNIMPLEMENTED. Errors are mapped by ``Instrumented``, which
also records ``cnnserve_requests_total{protocol="grpc",method=<RPC>,code}``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.dataplane import DataPlane
from service.errors import InvalidInput, shown
from service.grpc_api.instrumented import rpc
from service.metrics import Metrics
from service.protocol import metadata
from service.protocol import model_repository as repository
from service.protocol import open_inference as v2

SERVICE_NAME = "inference.GRPCInferenceService"
MAX_NAME = 256  # characters of a tensor name or datatype (as the REST binding: inference_rest.py)


def _parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` as plain values."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def request_from_proto(request: pb.ModelInferRequest) -> v2.InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, or use contents for every input"
        )
    inputs = []
    for i, t in enumerate(request.inputs):
        if len(t.name) > MAX_NAME or len(t.datatype) > MAX_NAME:
            # Names are echoed in errors further on: a megabyte-long one is refused here, cut short.
            raise InvalidInput(f"inputs[{i}]: name or datatype longer than {MAX_NAME} characters: {shown(t.name)}")
        fields = t.contents.ListFields()
        shape = list(t.shape)  # read from the message once: its checks and the tensor use the list
        if raw and fields:
            raise InvalidInput(f"input {t.name!r} has contents although the request uses raw_input_contents")
        if len(fields) > 1:
            raise InvalidInput(f"input {t.name!r} sets more than one contents field")
        if raw:
            inputs.append(v2.InputTensor(t.name, t.datatype, shape, raw=raw[i]))
        elif fields:
            descriptor, values = fields[0]
            inputs.append(v2.InputTensor(t.name, t.datatype, shape, data=values, contents=descriptor.name))
        else:
            inputs.append(v2.InputTensor(t.name, t.datatype, shape))
    for i, o in enumerate(request.outputs):
        if len(o.name) > MAX_NAME:
            raise InvalidInput(f"outputs[{i}]: name longer than {MAX_NAME} characters: {shown(o.name)}")
    outputs = [(o.name, _parameters(o.parameters)) for o in request.outputs]
    return v2.InferRequest(
        request.model_name, request.model_version, request.id, _parameters(request.parameters), inputs, outputs
    )


def response_to_proto(response: v2.InferResponse) -> pb.ModelInferResponse:
    """Outputs as ``raw_output_contents``, as Triton answers (BYTES: length-prefixed elements)."""
    Tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        outputs=[Tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in response.outputs],
        raw_output_contents=[o.raw() for o in response.outputs],
    )


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
        await repository.load(self.plane, request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        await repository.unload(self.plane, request.model_name, _parameters(request.parameters))
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
