"""The Open Inference Protocol (KServe v2) inference request, transport-free.

What the HTTP/REST binding (``service.http_api.inference_routes``, with its body format in
``service.http_api.inference_rest``) and the gRPC binding (``service.grpc_api.inference_service``)
share about inference lives here: turning a request's inputs into one float32 [n,3,32,32] tensor,
choosing the requested outputs and building them (classification strings included). The
metadata, configuration, readiness and statistics answers are in ``service.protocol.metadata``.
The bindings only translate their wire types to and from :class:`InferRequest` /
:class:`InferResponse`; every check raises a ``service.errors`` domain error, which each binding
maps to its status.

The model has one input (FP32 [-1,3,32,32], already normalised) and two outputs: the ONNX graph's
``logits`` and ``probabilities`` (their softmax, computed by the server). A request of N images
makes one call into the core (``InferenceCore.infer``), which checks and admits it before its
tensor is built and submits it to the model's queue as one request of N images. Where the model
version has a companion ``layers.onnx`` (``service.explain.layers``), its intermediate activations
are extra outputs a request may ask for by name (``conv1``, ``conv2``, ``pool``, ``fc3``, ``fc4``);
they are described in the model's configuration, are never sent unasked, and are computed by the
companion session in this process.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service import tracing
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.explain.layers import LAYER_NAMES
from service.inference.decoding import INLINE_DECODE_BYTES
from service.inference.runtime import BatchOutput
from service.inference.serving import LoadedModel
from service.protocol.metadata import FP32, PROBABILITIES, find_model

BYTES = "BYTES"
INLINE_PARSE_BYTES = INLINE_DECODE_BYTES  # larger JSON request parts are parsed in a worker thread

_LE_FP32 = np.dtype("<f4")
_LENGTH = struct.Struct("<I")


# ---- inference: request -------------------------------------------------------------------------
@dataclass
class InputTensor:
    """One request input. Exactly one of ``data`` (JSON numbers, nested or flat; a numpy array; a
    protobuf repeated field) and ``raw`` (little-endian bytes) is set. ``contents`` names the
    gRPC ``InferTensorContents`` field ``data`` came from."""

    name: str
    datatype: str
    shape: Sequence[int]
    data: Any = None
    raw: Any = None
    contents: str | None = None


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict[str, Any])
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, parameters)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    classification: int  # 0: the tensor itself
    binary: bool  # REST binding only: send in the binary section


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    binary: bool
    array: np.ndarray | None = None  # FP32
    strings: list[str] | None = None  # BYTES, row-major

    def raw(self) -> bytes:
        """The tensor as Triton's raw bytes: little-endian values; BYTES elements as a 4-byte
        little-endian length followed by the bytes."""
        if self.strings is None:
            assert self.array is not None  # FP32 tensors carry an array
            return self.array.astype(_LE_FP32, copy=False).tobytes()
        encoded = [s.encode() for s in self.strings]
        return b"".join([part for e in encoded for part in (_LENGTH.pack(len(e)), e)])

    def json_data(self) -> Any:
        if self.strings is not None:
            return self.strings
        assert self.array is not None  # FP32 tensors carry an array
        return self.array.reshape(-1)


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def typed_parameter(params: dict[str, Any], key: str, kind: type, default: Any, where: str) -> Any:
    value = params.get(key, default)
    if value is default:
        return value
    if (kind is bool and not isinstance(value, bool)) or (kind is int and not _is_int(value)):
        raise InvalidInput(
            f"{where} parameter {key!r} must be {'a boolean' if kind is bool else 'an integer'}, got {value!r}"
        )
    return value


def tensor_numbers(name: str, data: Any) -> np.ndarray:
    """JSON ``data`` (nested or flat lists) as one array, converted in C by numpy."""
    if isinstance(data, np.ndarray):
        return data
    try:
        return np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: data is not a regular array of numbers") from None


def input_count(model: LoadedModel, inputs: Sequence[InputTensor]) -> int:
    """The number of images of the request's only input, once its name, datatype and shape are
    checked (nothing is allocated yet)."""
    rt = model.runtime
    expected_name, image_shape = rt.input_name, tuple(rt.input_shape[1:])
    wanted = f"{FP32} [-1,{','.join(map(str, image_shape))}]"
    if len(inputs) != 1:
        names = ", ".join(repr(t.name) for t in inputs) or "none"
        raise InvalidInput(
            f"model {model.name!r} takes exactly one input {expected_name!r} ({wanted}); got {len(inputs)}: {names}"
        )
    t = inputs[0]
    if t.name != expected_name:
        raise InvalidInput(f"unexpected input {t.name!r}: model {model.name!r} takes one input {expected_name!r}")
    if t.datatype != FP32:
        raise InvalidInput(f"input {t.name!r} has datatype {t.datatype!r}; the model expects {FP32}")
    shape = list(t.shape)
    if (
        not all(_is_int(d) for d in shape)
        or len(shape) != 1 + len(image_shape)
        or tuple(shape[1:]) != image_shape
        or shape[0] < 0
    ):
        raise InvalidInput(f"input {t.name!r} has shape {shape}; the model expects {wanted}")
    return int(shape[0])


def decode_input(model: LoadedModel, inputs: Sequence[InputTensor], refuse_non_finite: bool = False) -> np.ndarray:
    """The request's only input as a float32 [n,3,32,32] tensor. Vectorised: ``np.frombuffer`` for
    raw bytes, one ``np.asarray`` for JSON / typed contents."""
    input_count(model, inputs)
    return _tensor(inputs[0], refuse_non_finite)


def _tensor(t: InputTensor, refuse_non_finite: bool) -> np.ndarray:
    """The values of an input whose name, datatype and shape ``input_count`` checked."""
    shape = [int(d) for d in t.shape]
    count = math.prod(shape)
    if t.raw is not None:
        if t.data is not None:
            raise InvalidInput(f"input {t.name!r} has both data and binary data")
        if len(t.raw) != count * 4:
            raise InvalidInput(
                f"input {t.name!r}: binary data is {len(t.raw)} bytes but {FP32} {shape} needs {count * 4}"
            )
        array = np.frombuffer(t.raw, dtype=_LE_FP32)
        if array.ctypes.data % array.itemsize:  # unaligned inside the request body
            array = array.copy()
        return _finite(refuse_non_finite, t.name, array.astype(np.float32, copy=False).reshape(shape))
    if t.contents is not None and t.contents != "fp32_contents":
        raise InvalidInput(
            f"input {t.name!r} is {FP32} but its data is in {t.contents}; use fp32_contents or raw_input_contents"
        )
    if t.data is None:
        raise InvalidInput(f"input {t.name!r} has no data")
    if t.contents == "fp32_contents":  # a protobuf repeated float: fromiter is the fastest copy
        array = np.fromiter(t.data, np.float32, len(t.data))
    else:
        array = tensor_numbers(t.name, t.data)
    if array.dtype.kind not in "fiu":
        raise InvalidInput(f"input {t.name!r}: data must hold numbers only")
    if array.size != count:
        raise InvalidInput(f"input {t.name!r}: data holds {array.size} values but {FP32} {shape} needs {count}")
    with np.errstate(over="ignore"):  # a number beyond FP32's range becomes ±Inf, as in Triton
        tensor = np.ascontiguousarray(array, dtype=np.float32).reshape(shape)
    return _finite(refuse_non_finite, t.name, tensor)


def _finite(refuse: bool, name: str, tensor: np.ndarray) -> np.ndarray:
    """With ``--refuse-non-finite``, refuse NaN and ±Inf (also finite JSON numbers beyond FP32's
    range, which become Inf). By default they pass, as in Triton: perf_analyzer's default input is
    random FP32 bits, NaN included, and a benchmark must run unmodified. Each image is computed on
    its own, so such a tensor changes only its own answer (JSON writes its NaN as null)."""
    if refuse and not np.isfinite(tensor).all():
        raise InvalidInput(f"input {name!r} holds NaN or infinite values (or numbers beyond FP32's range)")
    return tensor


def plan_outputs(
    model: LoadedModel,
    requested: Sequence[tuple[str, dict[str, Any]]],
    binary_default: bool,
    layer_names: Sequence[str] = (),
) -> list[OutputSpec]:
    """The outputs to answer: the requested ones in order, or logits and probabilities.

    ``classification: k`` turns an output into BYTES [n,k] strings ``"<probability>:<index>:<label>"``
    of the k most probable classes. Unlike Triton, which ranks and prints the output's raw values,
    the value printed is always the softmax probability, for ``logits`` as for ``probabilities``
    (the ranking is the same). k is capped at the number of classes, as Triton does.
    ``layer_names`` (the companion graph's outputs) may be asked for by name, without classification."""
    rt = model.runtime
    if not requested:
        return [OutputSpec(name, 0, binary_default) for name in (rt.output_name, PROBABILITIES)]
    known = (rt.output_name, PROBABILITIES, *layer_names)
    plan, seen = [], set()
    for name, params in requested:
        if name not in known:
            raise InvalidInput(
                f"unknown output {name!r}; model {model.name!r} has outputs {', '.join(map(repr, known))}"
            )
        if name in seen:
            raise InvalidInput(f"output {name!r} is requested twice")
        seen.add(name)
        where = f"output {name!r}"
        k = typed_parameter(params, "classification", int, 0, where)
        if k < 0:
            raise InvalidInput(f"{where}: classification must be a positive number of classes, got {k}")
        if k and name in layer_names:
            raise InvalidInput(f"{where}: classification applies to logits and probabilities only")
        binary = typed_parameter(params, "binary_data", bool, binary_default, where)
        plan.append(OutputSpec(name, min(int(k), rt.num_classes), binary))
    return plan


def classification_strings(model: LoadedModel, result: BatchOutput, k: int) -> list[str]:
    """Row-major ``"<probability>:<index>:<label>"`` strings of each image's top k (probabilities
    after softmax, printed with 6 decimals like Triton's ``std::to_string``)."""
    idx = result.order[:, :k]
    probs = np.take_along_axis(result.probabilities, idx, axis=1)
    suffixes = [f":{i}:{label}" for i, label in enumerate(model.runtime.labels)]
    return [f"{p:.6f}{suffixes[i]}" for p, i in zip(probs.ravel().tolist(), idx.ravel().tolist())]


def build_outputs(
    model: LoadedModel, plan: Sequence[OutputSpec], result: BatchOutput, layers: dict[str, np.ndarray] | None = None
) -> list[OutputTensor]:
    n = len(result.logits)
    outputs = []
    for spec in plan:
        if layers and spec.name in layers:
            array = layers[spec.name]
            outputs.append(OutputTensor(spec.name, FP32, list(array.shape), spec.binary, array=array))
        elif spec.classification:
            outputs.append(
                OutputTensor(
                    spec.name,
                    BYTES,
                    [n, spec.classification],
                    spec.binary,
                    strings=classification_strings(model, result, spec.classification),
                )
            )
        else:
            array = result.logits if spec.name == model.runtime.output_name else result.probabilities
            outputs.append(OutputTensor(spec.name, FP32, list(array.shape), spec.binary, array=array))
    return outputs


def request_deadline(request: InferRequest, deadline: float | None) -> float | None:
    """The transport's deadline, shortened by Triton's ``timeout`` request parameter
    (microseconds; 0 or absent: none)."""
    timeout_us = typed_parameter(request.parameters, "timeout", int, None, "request")
    if timeout_us is None or timeout_us == 0:
        return deadline
    if timeout_us < 0:
        raise InvalidInput(f"request parameter 'timeout' must be >= 0 microseconds, got {timeout_us}")
    own: float = time.monotonic() + timeout_us / 1e6
    return own if deadline is None else min(deadline, own)


async def infer(plane: DataPlane, request: InferRequest, deadline: float | None = None) -> InferResponse:
    """Validate, run through the model's queue as one request (one call into the core: one count
    check, one admission, and only then the tensor is built), and build the outputs."""
    model = find_model(plane, request.model, request.version)
    if not isinstance(request.id, str):
        raise InvalidInput("request id must be a string")
    if tracing.ENABLED and request.id:
        tracing.annotate(request_id=request.id)  # the v2 request's own id, as Triton reports it
    binary_default = typed_parameter(request.parameters, "binary_data_output", bool, False, "request")
    companion = plane.layer_models.get(model.name, model.version)
    plan = plan_outputs(model, request.outputs, binary_default, LAYER_NAMES if companion else ())
    count = input_count(model, request.inputs)
    deadline = request_deadline(request, deadline)
    tensor: np.ndarray | None = None  # kept: the layer outputs are computed from the same input

    def build() -> np.ndarray:
        nonlocal tensor
        tensor = _tensor(request.inputs[0], plane.settings.refuse_non_finite)
        return tensor

    result = await plane.core.infer(model, count, build, deadline)
    wanted = [spec.name for spec in plan if spec.name in LAYER_NAMES]
    layers = None
    if wanted and companion is not None and tensor is not None:
        # Activations cost this process's CPU as an explanation does: they go through the
        # explanations' admission (server-wide limits, the request's deadline) and the bounded
        # pool, not asyncio's shared one.
        async with plane.explainer.admission.slot(deadline):
            layers = await plane.pool.offload(companion.run, tensor, wanted)
    return InferResponse(model.name, model.version, request.id, build_outputs(model, plan, result, layers))
