"""The Open Inference Protocol (KServe v2) with Triton's extensions, transport-free.

Everything the HTTP/REST binding (``service.http_api.inference_routes``, with its body format in
``service.http_api.inference_rest``) and the gRPC binding (``service.grpc_api.inference_service``)
share lives here: server and model metadata, the model configuration in Triton's form,
statistics, turning an inference request's inputs into one float32 [n,3,32,32] tensor, choosing
the requested outputs and building them (classification strings included). The bindings only translate their wire types
to and from :class:`InferRequest` / :class:`InferResponse` and plain dicts; every check raises a
``service.errors`` domain error, which the bindings map with ``service.errors``' two tables.

Supported Triton extensions: ``classification``, ``binary_tensor_data``, ``model_configuration``,
``statistics`` (plus ``POST /v2/repository/index`` / ``RepositoryIndex`` as a read-only listing).

The model has one input (FP32 [-1,3,32,32], already normalised) and two outputs: the ONNX graph's
``logits`` and ``probabilities`` (their softmax, computed by the server). A request of N images
is submitted to the batcher as one request of N images. Where the model version has a companion
``layers.onnx`` (``service.explain.layers``), its intermediate activations are extra outputs a request
may ask for by name (``conv1``, ``conv2``, ``pool``, ``fc3``, ``fc4``); they are listed in the
model's metadata and configuration, are never sent unasked, and are computed by the companion
session in this process.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from service import __version__
from service.errors import InvalidInput
from service.explain.layers import DROPOUT_NOTE, LAYER_NAMES
from service.inference.core import INLINE_DECODE_BYTES, InferenceCore, LoadedModel
from service.inference.runtime import CUDA, BatchOutput

SERVER_NAME = "cnnserve"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
PROBABILITIES = "probabilities"
FP32 = "FP32"
BYTES = "BYTES"
TYPE_FP32 = "TYPE_FP32"
INLINE_PARSE_BYTES = INLINE_DECODE_BYTES  # larger JSON request parts are parsed in a worker thread

_LE_FP32 = np.dtype("<f4")
_LENGTH = struct.Struct("<I")


# ---- server -------------------------------------------------------------------------------------
def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


# ---- models -------------------------------------------------------------------------------------
def find_model(core: InferenceCore, name: str, version: str | None = None) -> LoadedModel:
    """The model version a request names; raises NotReady / ModelNotFound / InvalidInput."""
    if not name:
        raise InvalidInput("a model name is required")
    return core.model(name, version or None)


def model_ready(core: InferenceCore, name: str, version: str | None = None) -> bool:
    """Whether the model version can take requests now: False while loading or draining;
    raises ModelNotFound for a model that is not in the repository."""
    if not core.is_ready:
        return False
    find_model(core, name, version)
    return True


def _versions(core: InferenceCore, name: str) -> list[str]:
    return sorted(core.models.get(name, {}), key=int)


def layer_shapes(core: InferenceCore, model: LoadedModel) -> dict[str, list[int]]:
    """The extra layer outputs of a model version (name -> shape with -1 for the batch), empty
    when it has no companion graph."""
    companion = core.layer_model(model)
    if companion is None:
        return {}
    return {name: [-1, *companion.shapes[name][1:]] for name in LAYER_NAMES}


def model_metadata(core: InferenceCore, name: str, version: str | None = None) -> dict:
    model = find_model(core, name, version)
    rt = model.runtime
    classes = [-1, rt.num_classes]
    return {
        "name": model.name,
        "versions": [model.version] if version else _versions(core, model.name),
        "platform": PLATFORM,
        "inputs": [{"name": rt.input_name, "datatype": FP32, "shape": list(rt.input_shape)}],
        # The layer outputs are not listed (here nor in the configuration's ``output``): tools that
        # request every listed output (Triton's perf_analyzer) would compute all of them on every
        # request. The configuration's parameters.layer_outputs describes them; a request asks by name.
        "outputs": [
            {"name": rt.output_name, "datatype": FP32, "shape": classes},
            {"name": PROBABILITIES, "datatype": FP32, "shape": classes},
        ],
    }


def model_config(core: InferenceCore, name: str, version: str | None = None) -> dict:
    """The model's configuration in Triton's ``ModelConfig`` form (proto field names, dims
    without the batch dimension), valid input for ``json_format.ParseDict``. ``parameters`` add
    the execution provider, the precision variant that answers (its file is
    ``default_model_filename``, as in Triton), the labels and the input's preprocessing (JSON
    strings), which a client needs to build the normalised input tensor. Every variant takes and
    answers FP32 tensors."""
    model = find_model(core, name, version)
    rt, batcher, s = model.runtime, model.batcher, core.settings
    on_gpu = rt.provider == CUDA
    classes = [rt.num_classes]
    layers = layer_shapes(core, model)
    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"all": {}},
        "max_batch_size": batcher.max_batch_size,
        "input": [
            {"name": rt.input_name, "data_type": TYPE_FP32, "format": "FORMAT_NCHW", "dims": list(rt.input_shape[1:])}
        ],
        "output": [
            {"name": rt.output_name, "data_type": TYPE_FP32, "dims": classes, "label_filename": ""},
            {"name": PROBABILITIES, "data_type": TYPE_FP32, "dims": classes, "label_filename": ""},
        ],
        "dynamic_batching": {
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": round(batcher.max_queue_delay_s * 1e6),
            "preserve_ordering": False,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(s.default_timeout_ms * 1000),
                "allow_timeout_override": True,
                "max_queue_size": batcher.max_queue_size,
            },
        },
        "instance_group": [
            {
                "name": f"{model.name}_0",
                "kind": "KIND_GPU" if on_gpu else "KIND_CPU",
                "count": 1,
                "gpus": [s.cuda_device_id] if on_gpu else [],
            }
        ],
        "default_model_filename": rt.path.name,
        "parameters": {
            "execution_provider": {"string_value": rt.provider},
            "precision": {"string_value": rt.precision},
            "labels": {"string_value": orjson.dumps(rt.labels).decode()},
            "preprocessing": {"string_value": orjson.dumps(rt.preprocessing).decode()},
        },
    }
    if layers:
        config["parameters"]["layer_outputs"] = {
            "string_value": orjson.dumps(
                {
                    "outputs": [{"name": n, "datatype": FP32, "shape": shape} for n, shape in layers.items()],
                    "description": "intermediate activations (conv1, conv2, fc3 after ReLU; fc4 = logits), "
                    f"computed only when a request names them. {DROPOUT_NOTE}",
                }
            ).decode()
        }
    return config


def repository_index(core: InferenceCore) -> list[dict]:
    state = "READY" if core.is_ready else "UNAVAILABLE"
    return [{"name": m.name, "version": m.version, "state": state, "reason": ""} for m in core.all_models()]


def _duration(count: int, ns: int) -> dict:
    return {"count": count, "ns": ns}


def _model_stats(model: LoadedModel) -> dict:
    """One model version's statistics in Triton's shape, from its ModelStats.

    The runtime does preprocessing, the ONNX run and the softmax in one step, so all of it is in
    ``compute_infer``; ``compute_input``/``compute_output`` carry the same counts with 0 ns.
    As in Triton, ``queue`` and ``compute_*`` in ``inference_stats`` count requests, each charged its
    whole batch's compute time; ``batch_stats`` and ``execution_count`` count executed batches."""
    s = model.stats_total()
    return {
        "name": model.name,
        "version": model.version,
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": _duration(s.success_count, s.success_ns),
            "fail": _duration(s.fail_count, s.fail_ns),
            "queue": _duration(s.queue_count, s.queue_ns),
            "compute_input": _duration(s.request_compute_count, 0),
            "compute_infer": _duration(s.request_compute_count, s.request_compute_ns),
            "compute_output": _duration(s.request_compute_count, 0),
            "cache_hit": _duration(0, 0),
            "cache_miss": _duration(0, 0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(count, 0),
                "compute_infer": _duration(count, ns),
                "compute_output": _duration(count, 0),
            }
            for size, (count, ns) in sorted(s.batches.items())
        ],
        "memory_usage": [],
        "response_stats": {},  # decoupled models only
    }


def model_statistics(core: InferenceCore, name: str | None = None, version: str | None = None) -> dict:
    """Statistics of every model (no name), of every version of one model (no version), or of
    one version."""
    if not name:
        models = core.all_models() if core.ready else []
    elif version:
        models = [find_model(core, name, version)]
    else:
        find_model(core, name)
        models = [core.models[name][v] for v in _versions(core, name)]
    return {"model_stats": [_model_stats(m) for m in models]}


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
    parameters: dict = field(default_factory=dict)
    inputs: list[InputTensor] = field(default_factory=list)
    outputs: list[tuple[str, dict]] = field(default_factory=list)  # (name, parameters)


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


def typed_parameter(params: dict, key: str, kind: type, default: Any, where: str) -> Any:
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


def decode_input(core: InferenceCore, model: LoadedModel, inputs: Sequence[InputTensor]) -> np.ndarray:
    """The request's only input as a float32 [n,3,32,32] tensor. Vectorised: ``np.frombuffer`` for
    raw bytes, one ``np.asarray`` for JSON / typed contents."""
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
    n = int(shape[0])
    core.check_image_count(n)  # before allocating anything
    count = n * math.prod(image_shape)
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
        return _finite(t.name, array.astype(np.float32, copy=False).reshape(shape))
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
    return _finite(t.name, np.ascontiguousarray(array, dtype=np.float32).reshape(shape))


def _finite(name: str, tensor: np.ndarray) -> np.ndarray:
    """Refuse NaN and ±Inf (also finite JSON numbers beyond FP32's range, which become Inf): the
    model's answer to them is NaN, which no client can use."""
    if not np.isfinite(tensor).all():
        raise InvalidInput(f"input {name!r} holds NaN or infinite values (or numbers beyond FP32's range)")
    return tensor


def plan_outputs(
    model: LoadedModel,
    requested: Sequence[tuple[str, dict]],
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


def request_deadline(core: InferenceCore, request: InferRequest, deadline: float | None) -> float | None:
    """The transport's deadline, shortened by Triton's ``timeout`` request parameter
    (microseconds; 0 or absent: none)."""
    timeout_us = typed_parameter(request.parameters, "timeout", int, None, "request")
    if timeout_us is None or timeout_us == 0:
        return deadline
    if timeout_us < 0:
        raise InvalidInput(f"request parameter 'timeout' must be >= 0 microseconds, got {timeout_us}")
    own = time.monotonic() + timeout_us / 1e6
    return own if deadline is None else min(deadline, own)


async def infer(core: InferenceCore, request: InferRequest, deadline: float | None = None) -> InferResponse:
    """Validate, run through the model's batcher as one request, and build the outputs."""
    model = find_model(core, request.model, request.version)
    if not isinstance(request.id, str):
        raise InvalidInput("request id must be a string")
    binary_default = typed_parameter(request.parameters, "binary_data_output", bool, False, "request")
    companion = core.layer_model(model)
    plan = plan_outputs(model, request.outputs, binary_default, LAYER_NAMES if companion else ())
    if len(request.inputs) == 1 and request.inputs[0].shape and _is_int(request.inputs[0].shape[0]):
        n = int(request.inputs[0].shape[0])
        if n > 0:
            core.check_image_count(n)
            core.admit(model, n)  # refused before the tensor is built
    tensor = decode_input(core, model, request.inputs)
    wanted = [spec.name for spec in plan if spec.name in LAYER_NAMES]
    deadline = request_deadline(core, request, deadline)
    result = await core.infer_tensor(model, tensor, deadline)
    layers = None
    if wanted and companion:
        # Activations cost this process's CPU as an explanation does: they go through the
        # explanations' admission (server-wide limits, the request's deadline) and the core's
        # bounded pool, not asyncio's shared one.
        async with core.explainer.admission.slot(deadline):
            layers = await core.offload(companion.run, tensor, wanted)
    return InferResponse(model.name, model.version, request.id, build_outputs(model, plan, result, layers))
