"""Open Inference Protocol gRPC messages (tritonclient's generated ``service_pb2``) ↔
``service.protocol.open_inference``'s request and response, for ModelInfer and ModelStreamInfer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from service.errors import InvalidInput, shown
from service.protocol import open_inference as v2

MAX_NAME = 256  # characters of a tensor name or datatype (as the REST binding: inference_rest.py)


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
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
    outputs = [(o.name, parameters(o.parameters)) for o in request.outputs]
    return v2.InferRequest(
        request.model_name, request.model_version, request.id, parameters(request.parameters), inputs, outputs
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
