"""One ONNX Runtime session per model version: which precision variant, providers, options,
metadata, and the batch function the batcher calls (preprocess → run → softmax → ranking, all over
the whole batch)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from service.inference import devices
from service.inference.postprocess import ranking, softmax
from service.inference.precision import (
    PrecisionChoice,
    agreement,
    describe_cpu,
    load_check_images,
    time_pair,
)
from service.inference.preprocess import Normalizer, Preprocessing
from service.inference.repository import ModelSpec
from service.settings import Settings

log = logging.getLogger("cnnserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


#: The variant "auto" considers on each provider: there it answers only where it passes its check
#: against FP32 and is faster at batch 1 and max_batch_size on this machine
#: (service/inference/precision.py); elsewhere, and where the file is absent, FP32 answers. Not
#: FP16 on CUDA: not yet measured on a GPU, and served throughput there is bound by the Python
#: process rather than the GPU (docs/gpu.md), so FP32 stays the default until scripts/gpu-check.sh
#: shows FP16 pays; ask for it with precision=fp16.
AUTO_PRECISION = {CPU: "int8"}
#: The provider each variant is made for; elsewhere it runs, but is not expected to be faster.
MEANT_FOR = {"int8": CPU, "fp16": CUDA}
#: The supervisor's choices for its worker processes (one measurement, the same answer in every
#: process): JSON {"name/version": PrecisionChoice.to_dict()}.
PLAN_ENVIRONMENT = "_CNNSERVE_PRECISION_PLAN"


def planned_choice(spec: ModelSpec) -> PrecisionChoice | None:
    """The supervisor's choice for ``spec`` (PLAN_ENVIRONMENT), if it made one."""
    plan = json.loads(os.environ.get(PLAN_ENVIRONMENT) or "{}").get(f"{spec.name}/{spec.version}")
    return PrecisionChoice(**plan) if plan else None


class PrecisionCheckFailed(RuntimeError):
    """The precision asked for explicitly disagrees with FP32 on this machine: refusing to start."""


class GpuRequired(RuntimeError):
    """--require-gpu was given and the session did not get the CUDA provider."""


class ModelLoadError(RuntimeError):
    """A model version could not be loaded; the message names its file and the cause."""


def load_model(spec: ModelSpec, settings: Settings) -> ModelRuntime:
    """A warmed-up runtime for ``spec``; any failure is one ModelLoadError naming the file."""
    try:
        runtime = ModelRuntime(spec, settings)
        runtime.warm_up(settings.max_batch_size)
    except (GpuRequired, PrecisionCheckFailed):
        raise
    except Exception as e:  # noqa: BLE001 - ORT raises many types (InvalidProtobuf, Fail, ...)
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {spec.path.resolve()}: {cause}") from None
    return runtime


class BatchOutput(NamedTuple):
    logits: np.ndarray  # float32 [n, classes]
    probabilities: np.ndarray  # float32 [n, classes]
    order: np.ndarray  # int64 [n, classes], most probable class first
    # The same ranking as Python lists, made once per batch in the executor thread so that each
    # request only slices them: [n][classes] indices, probabilities and labels, best first.
    ranked_indices: list[list[int]]
    ranked_probabilities: list[list[float]]
    ranked_labels: list[list[str]]


def provider_options(settings: Settings, names: list[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(provider, options) pairs for ``names`` (default: the settings' providers)."""
    out = []
    for name in settings.providers if names is None else names:
        opts: dict[str, Any] = {}
        if name == CUDA:
            opts = {"device_id": settings.cuda_device_id, "cudnn_conv_algo_search": settings.cudnn_conv_algo_search}
            if settings.gpu_mem_limit_mb:
                opts["gpu_mem_limit"] = settings.gpu_mem_limit_mb * 1024 * 1024
        out.append((name, opts))
    return out


def default_intra_op_threads() -> int:
    """Usable cores (CPU affinity and a container's CPU limit) minus one for the event loop."""
    return max(1, devices.usable_cores() - 1)


def session_options(settings: Settings) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = settings.intra_op_threads or default_intra_op_threads()
    so.inter_op_num_threads = settings.inter_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.ort_allow_spinning else "0")
    so.log_severity_level = devices.onnxruntime_log_severity(settings.log_level)
    return so


_announced: set[str] = set()


def session_providers(settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """The settings' providers less those that cannot run here (CUDA without a driver or a
    library), said once per process in one line of ours; GpuRequired under --require-gpu."""
    names, reason = devices.usable_providers(settings.providers)
    if reason is not None:
        if settings.require_gpu:
            raise GpuRequired(f"{reason}; refusing to start because require_gpu is set")
        if reason not in _announced:
            _announced.add(reason)
            log.warning("%s: running on the CPU", reason)
    return provider_options(settings, names or [CPU])


def read_metadata(path: object, meta: dict[str, str]) -> tuple[list[str], Preprocessing]:
    """The labels and preprocessing from a model's ONNX metadata (docs/models.md); ValueError
    naming the file and what is missing or malformed otherwise."""
    hint = "add them with `cnnserve import-model` (docs/models.md)"
    missing = [key for key in ("labels", "preprocessing") if key not in meta]
    if missing:
        raise ValueError(f"{path}: model metadata lacks {' and '.join(missing)}; {hint}")
    try:
        labels = json.loads(meta["labels"])
        pre = Preprocessing.parse(json.loads(meta["preprocessing"]))
    except ValueError as e:
        raise ValueError(f"{path}: model metadata is malformed ({e}); {hint}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{path}: metadata labels must be a JSON list of strings; {hint}")
    return labels, pre


def check_input(
    path: object, input_shape: list[int], pre: Preprocessing, classes: int, output_shape: list[int | str | None]
) -> None:
    """The graph's input and output agree with the metadata: [N,3,H,W] at the preprocessing's
    size, and one score per label."""
    if len(input_shape) != 4 or input_shape[1] != 3:
        raise ValueError(f"{path}: the model's input is {input_shape}; an image classifier takes [N,3,H,W]")
    if input_shape[0] != -1:
        raise ValueError(
            f"{path}: the model's batch dimension is fixed at {input_shape[0]}; the server batches requests, so it "
            "must be dynamic (`cnnserve import-model` makes it so)"
        )
    if input_shape[2:] != list(pre.size) and all(d > 0 for d in input_shape[2:]):
        raise ValueError(f"{path}: the model's input is {input_shape} but its preprocessing size is {list(pre.size)}")
    last = output_shape[-1] if output_shape else None
    if isinstance(last, int) and last != classes:
        raise ValueError(f"{path}: the model answers {last} scores but its metadata has {classes} labels")


class ModelRuntime:
    """A loaded model version. ``run_batch`` is thread-safe (ORT sessions are) and is called from
    the batcher's executor thread, never on the event loop."""

    def __init__(self, spec: ModelSpec, settings: Settings) -> None:
        self.spec = spec
        self.name, self.version = spec.name, spec.version
        devices.quiet_onnxruntime(settings.log_level)
        providers = session_providers(settings)
        available = spec.variants()
        if settings.precision != "auto" and settings.precision not in available:
            raise FileNotFoundError(
                f"{spec.name}/{spec.version}: precision {settings.precision} was asked for but "
                f"{spec.variant_path(settings.precision)} is absent (present: {', '.join(available)}; "
                "cnnserve quantize writes the variants; precision auto falls back to fp32)"
            )
        #: The variant that answers ("fp32", "int8" or "fp16"), its file, and why (the check
        #: against FP32 and the timing on this machine: service/inference/precision.py).
        self.session, self.choice = self._choose(spec, settings, providers, available)
        self.precision = self.choice.precision
        self.provider = self.session.get_providers()[0]
        self.path = spec.variant_path(self.precision)
        if MEANT_FOR.get(self.precision, self.provider) != self.provider:
            log.warning(
                "%s/%s: the %s variant is made for %s; on %s it is not expected to beat fp32",
                spec.name,
                spec.version,
                self.precision,
                MEANT_FOR[self.precision],
                self.provider,
            )
        if any(p == CUDA for p, _ in providers) and self.provider != CUDA:
            # The probe passed but ONNX Runtime still chose another provider (a wrong device
            # ordinal, a driver too old for this CUDA): its own log says why at --log-level DEBUG.
            message = (
                f"{spec.name}/{spec.version}: CUDA was asked for but the session runs on {self.provider} "
                "(--log-level DEBUG shows onnxruntime's own messages)"
            )
            if settings.require_gpu:
                raise GpuRequired(message + "; refusing to start because require_gpu is set")
            log.warning(message + "; running on the CPU")

        meta = self.session.get_modelmeta().custom_metadata_map
        self.labels, pre = read_metadata(self.path, meta)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = [d if isinstance(d, int) else -1 for d in inp.shape]  # [-1, 3, 32, 32]
        check_input(self.path, self.input_shape, pre, len(self.labels), self.session.get_outputs()[0].shape)
        self.input_shape = [-1, 3, *pre.size]  # spatial dimensions the graph leaves dynamic: the metadata's size
        self.preprocessing = pre.to_metadata()
        self.image_size = pre.size
        self.normalizer = Normalizer(pre)
        self.output_name = self.session.get_outputs()[0].name
        self.num_classes = len(self.labels)
        self.labels_array = np.array(self.labels, dtype=object)
        pad = settings.pad_batches == "on" or (settings.pad_batches == "auto" and self.provider == CUDA)
        #: Batches smaller than this are padded up to it (0: never). Samples are independent
        #: in this model, so padding rows change nothing in the real ones.
        self.pad_to = settings.max_batch_size if pad else 0
        self._padded = threading.local()  # one [pad_to, ...] input buffer per calling thread

    @property
    def precision_choice(self) -> dict[str, Any]:
        """Why this precision answers, with the figures measured at load (PrecisionChoice)."""
        return self.choice.to_dict()

    def describe(self) -> dict[str, Any]:
        """What a front end in another process needs (``service.inference.model_description.ModelDescription``)."""
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "preprocessing": self.preprocessing,
            "input_name": self.input_name,
            "input_shape": self.input_shape,
            "output_name": self.output_name,
            "provider": self.provider,
            "pad_to": self.pad_to,
            "precision": self.precision,
            "path": str(self.path),
            "precision_choice": self.choice.to_dict(),
        }

    def _choose(
        self,
        spec: ModelSpec,
        settings: Settings,
        providers: list[tuple[str, dict[str, Any]]],
        available: tuple[str, ...],
    ) -> tuple[ort.InferenceSession, PrecisionChoice]:
        """The session that answers and why: the FP32 model is opened first (the provider the
        session really got decides the candidate; the check compares against it), then the
        candidate variant is checked on the check inputs and, for auto, timed against FP32."""
        requested, name = settings.precision, f"{spec.name}/{spec.version}"
        started = time.perf_counter()
        fp32 = self._open(spec.path, settings, providers)
        provider = fp32.get_providers()[0]
        plan = planned_choice(spec) if requested == "auto" else None
        if requested == "fp32":
            return fp32, PrecisionChoice(requested, "fp32", "asked")
        if plan is not None and plan.precision == "fp32":
            return fp32, plan  # the supervisor found the variant slower, failing or absent
        candidate: str = requested
        if requested == "auto":
            candidate = plan.precision if plan is not None else AUTO_PRECISION.get(provider, "")
            if not candidate:
                return fp32, PrecisionChoice(requested, "fp32", "provider")
            if candidate not in available:
                return fp32, PrecisionChoice(requested, "fp32", "absent", candidate)
        variant = self._open(spec.variant_path(candidate), settings, providers)
        choice = PrecisionChoice(requested, candidate, "passed", candidate)
        images = load_check_images(spec.path)
        if images is None:
            if requested == "auto":
                choice.precision, choice.reason = "fp32", "no-check-inputs"
                log.warning("%s: %s", name, choice.summary())
                return fp32, choice
            choice.reason = "unchecked"
            log.warning("%s: %s (cnnserve quantize writes them beside model.onnx)", name, choice.summary())
            return variant, choice
        _, pre = read_metadata(spec.path, fp32.get_modelmeta().custom_metadata_map)
        x = Normalizer(pre)(images)
        choice.check_images = len(x)
        choice.check_agreement = agreement(fp32, variant, x, settings.max_batch_size)
        if choice.check_agreement < choice.threshold:
            message = (
                f"{name}: the {candidate} variant agrees with fp32 on top-1 for only "
                f"{100 * choice.check_agreement:.1f} % of {len(x)} check images (at least "
                f"{100 * choice.threshold:g} % needed) on CPU {describe_cpu(choice.cpu)}"
            )
            if requested != "auto":
                raise PrecisionCheckFailed(
                    f"{message}; refusing to start because precision {candidate} was asked for (precision auto "
                    "or fp32 serves fp32; `cnnserve quantize` re-quantizes)"
                )
            log.warning("%s; serving fp32 instead", message)
            choice.precision, choice.reason = "fp32", "check-failed"
            choice.seconds = round(time.perf_counter() - started, 3)
            return fp32, choice
        if requested == "auto":
            if plan is not None:
                choice.timing, choice.reason = plan.timing, plan.reason
            else:
                choice.timing = time_pair(fp32, variant, x, sorted({1, settings.max_batch_size}))
                if all(t["speedup"] > 1 for t in choice.timing.values()):
                    choice.reason = "faster"
                else:
                    choice.precision, choice.reason = "fp32", "slower"
        choice.seconds = round(time.perf_counter() - started, 3)
        # A worker following the supervisor's plan says nothing new: the supervisor logged the decision.
        log.log(
            logging.DEBUG if plan is not None else logging.INFO,
            "%s: %s (%.2fs)",
            name,
            choice.summary(),
            choice.seconds,
        )
        return (variant if choice.precision == candidate else fp32), choice

    @staticmethod
    def _open(path: Path, settings: Settings, providers: list[tuple[str, dict[str, Any]]]) -> ort.InferenceSession:
        # Read the bytes ourselves: works for any readable file (a mounted volume, a pipe).
        return ort.InferenceSession(
            path.read_bytes(),
            sess_options=session_options(settings),
            providers=[p for p, _ in providers],
            provider_options=[o for _, o in providers],
        )

    def prepare(self, parts: list[np.ndarray]) -> np.ndarray:
        """Concatenate requests' images into one model input. uint8 [n,H,W,3] parts (decoded
        images) are normalised together in one vectorised step; float32 [n,3,H,W] parts (Open
        Inference Protocol tensors, already preprocessed) are used as they are."""
        if all(p.dtype == np.uint8 for p in parts):
            return self.normalizer(parts[0] if len(parts) == 1 else np.concatenate(parts))
        if all(p.dtype == np.float32 for p in parts):
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        sizes = [len(p) for p in parts]
        x = np.empty((sum(sizes), *self.input_shape[1:]), np.float32)
        starts = np.cumsum([0, *sizes])
        is_u8 = [p.dtype == np.uint8 for p in parts]
        if any(is_u8):
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i, u in enumerate(is_u8) if u])
            x[rows] = self.normalizer(np.concatenate([p for p, u in zip(parts, is_u8) if u]))
        for i, p in enumerate(parts):
            if not is_u8[i]:
                x[starts[i] : starts[i + 1]] = p
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n < self.pad_to:
            padded = getattr(self._padded, "buffer", None)
            if padded is None:
                padded = self._padded.buffer = np.zeros((self.pad_to, *self.input_shape[1:]), np.float32)
            # Rows past n keep an earlier batch's inputs (even a client's NaN tensor): each sample is
            # computed on its own and those rows' outputs are dropped, so they never reach real rows.
            padded[:n] = x
            return self.session.run([self.output_name], {self.input_name: padded})[0][:n]
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def run_batch(self, parts: list[np.ndarray]) -> BatchOutput:
        logits = self.run(self.prepare(parts))
        probs = softmax(logits.copy())
        order = ranking(probs)
        return BatchOutput(
            logits,
            probs,
            order,
            order.tolist(),
            np.take_along_axis(probs, order, axis=1).tolist(),
            self.labels_array[order].tolist(),
        )

    def warm_up(self, max_batch_size: int) -> None:
        """Run every power-of-two batch size up to the max once, so first requests pay no
        allocation or (CUDA) kernel-selection cost."""
        sizes = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        if self.pad_to:
            sizes = [max(sizes)]  # every smaller batch runs at the padded shape
        for n in sizes:
            self.run(np.zeros((n, *self.input_shape[1:]), np.float32))
