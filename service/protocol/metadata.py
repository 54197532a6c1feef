"""The Open Inference Protocol's answers about the server and its models, transport-free: server
and model metadata, readiness, the model configuration in Triton's form, the repository index
and statistics. The bindings (``service.http_api.inference_routes``,
``service.grpc_api.inference_service``) turn these plain dicts into their wire types; every check
raises a ``service.errors`` domain error, which each binding maps to its status.
"""

from __future__ import annotations

from typing import Any

import orjson

from service import __version__
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.explain.layers import DROPOUT_NOTE, LAYER_NAMES
from service.inference.runtime import CUDA
from service.inference.serving import LoadedModel

SERVER_NAME = "cnnserve"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
EXTENSIONS = ["classification", "binary_tensor_data", "model_configuration", "statistics"]
PROBABILITIES = "probabilities"
FP32 = "FP32"
TYPE_FP32 = "TYPE_FP32"


# ---- server -------------------------------------------------------------------------------------
def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


# ---- models -------------------------------------------------------------------------------------
def find_model(plane: DataPlane, name: str, version: str | None = None) -> LoadedModel:
    """The model version a request names; raises NotReady / ModelNotFound / InvalidInput."""
    if not name:
        raise InvalidInput("a model name is required")
    return plane.core.model(name, version or None)


def model_ready(plane: DataPlane, name: str, version: str | None = None) -> bool:
    """Whether the model version can take requests now: False while loading or draining;
    raises ModelNotFound for a model that is not in the repository."""
    if not plane.readiness.is_ready:
        return False
    find_model(plane, name, version)
    return True


def layer_shapes(plane: DataPlane, model: LoadedModel) -> dict[str, list[int]]:
    """The extra layer outputs of a model version (name -> shape with -1 for the batch), empty
    when it has no companion graph."""
    companion = plane.layer_models.get(model.name, model.version)
    if companion is None:
        return {}
    return {name: [-1, *companion.shapes[name][1:]] for name in LAYER_NAMES}


def model_metadata(plane: DataPlane, name: str, version: str | None = None) -> dict[str, Any]:
    model = find_model(plane, name, version)
    rt = model.runtime
    classes = [-1, rt.num_classes]
    return {
        "name": model.name,
        "versions": [model.version] if version else [m.version for m in plane.core.models(model.name)],
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


def model_config(plane: DataPlane, name: str, version: str | None = None) -> dict[str, Any]:
    """The model's configuration in Triton's ``ModelConfig`` form (proto field names, dims
    without the batch dimension), valid input for ``json_format.ParseDict``. ``parameters`` add
    the execution provider, the precision variant that answers (its file is
    ``default_model_filename``, as in Triton), the labels and the input's preprocessing (JSON
    strings), which a client needs to build the normalised input tensor. Every variant takes and
    answers FP32 tensors."""
    model = find_model(plane, name, version)
    rt, batcher, s = model.runtime, model.batcher, plane.settings
    on_gpu = rt.provider == CUDA
    classes = [rt.num_classes]
    layers = layer_shapes(plane, model)
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
            "precision_choice": {"string_value": orjson.dumps(getattr(rt, "precision_choice", None)).decode()},
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


def repository_index(plane: DataPlane) -> list[dict[str, str]]:
    state = "READY" if plane.readiness.is_ready else "UNAVAILABLE"
    return [{"name": m.name, "version": m.version, "state": state, "reason": ""} for m in plane.core.models()]


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


def _model_stats(model: LoadedModel) -> dict[str, Any]:
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


def model_statistics(plane: DataPlane, name: str | None = None, version: str | None = None) -> dict[str, Any]:
    """Statistics of every model (no name), of every version of one model (no version), or of
    one version."""
    if not name:
        models = plane.core.models()  # none before the models are served
    elif version:
        models = [find_model(plane, name, version)]
    else:
        models = plane.core.models(name)
    return {"model_stats": [_model_stats(m) for m in models]}
