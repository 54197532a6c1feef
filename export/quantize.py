"""Faster precision variants of an exported FP32 model, each checked before it is written.

- **int8** (for the CPU): ONNX Runtime's static quantization (``quant_pre_process``, then
  ``quantize_static``): QDQ format, by default (recipe ``u8s8-rr``, INT8_RECIPES) int8 weights in
  7 bits (``reduce_range``: they cannot saturate ONNX Runtime's ``vpmaddubsw`` kernels on x86
  CPUs without VNNI) per output channel, uint8 activations with
  MinMax ranges calibrated on ``calibration_images`` training images drawn with
  ``numpy.random.default_rng(calibration_seed)`` from the training split (never the validation
  split the check uses). The layer that produces the logits (here fc4: 5,130 weights, ~0.1 % of
  the compute) stays FP32 by default: quantizing its 512-wide input to one per-tensor scale is
  what moves most answers (top-1 agreement with FP32 on the validation split, recipe u8s8-rr:
  98.86 % with it, 99.12 % without it, for the same speed; the 8-bit recipe where exact: 98.96 %
  and 99.44 %).
- **fp16** (for CUDA): every initializer and operator in float16 (onnxconverter-common's
  ``convert_float_to_float16``) with ``keep_io_types=True``, so input and output stay FP32 and
  clients see no difference. Its agreement with FP32 is checked as ``cnnserve export`` checks the
  ONNX file against torch, on the first 512 validation images with the CPU provider: max |logit
  difference| at most ``FP16_PARITY_ATOL`` and identical argmax wherever FP32's top two logits are
  further apart than that. ORT's x86 CPU provider has no FP16 kernels for these operators: it
  casts the FP16 weights back to FP32 and computes in FP32, so this check covers the rounding of
  the weights to FP16, not FP16 arithmetic; that is checked on CUDA by tests/test_gpu.py
  (scripts/gpu-check.sh).

Both are refused (nothing written) when their top-1 on the held-out validation split falls more
than ``max_accuracy_drop_pp`` percentage points below the FP32 model's, or when they fail the
check the server runs at every load (top-1 agreement with FP32 on ``check_inputs.npz``, which is
written beside the model: CHECK_IMAGES synthetic images, export/check_inputs.py). Every figure is
recorded with the CPU it was measured on (``measured_on``: model and /proc/cpuinfo flags).
``python -m export.quantize`` measures every INT8 recipe on this machine (``compare_recipes``). The variant is written
beside the model (``model.int8.onnx``, ``model.fp16.onnx``; see service/inference/repository.py) with the
FP32 metadata (labels, preprocessing) and, added, ``precision``, ``variant_of`` (the FP32 file's
sha256), ``val_top1`` (the variant's own) and ``quantization`` (the recipe and the calibration
images' count, seed and selection), all JSON strings.

Needs numpy, onnx, onnxruntime and, for fp16, onnxconverter-common (the ``train`` extra); no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.check_inputs import CHECK_SEED, synthetic_check_images
from export.data import load_split
from export.evaluate import predict, summarize
from service.inference.precision import AGREEMENT_THRESHOLD, CHECK_INPUTS_FILENAME, cpu_features, describe_cpu
from service.inference.preprocess import Normalizer, Preprocessing
from service.inference.repository import variant_filename

VARIANTS = ("int8", "fp16")
DEFAULT_CALIBRATION_IMAGES = 512
DEFAULT_CALIBRATION_SEED = 0
DEFAULT_MAX_ACCURACY_DROP_PP = 0.5
CALIBRATION_BATCH = 128
PARITY_IMAGES = 512
# Measured: 3.7e-3 at most over the 5,000 validation images (logits reach ±12).
FP16_PARITY_ATOL = 2e-2


class VariantRejected(RuntimeError):
    """The variant failed its accuracy or parity check; nothing was written."""


@dataclass(frozen=True)
class Calibration:
    images: int = DEFAULT_CALIBRATION_IMAGES
    seed: int = DEFAULT_CALIBRATION_SEED
    quantize_output_layer: bool = False


@dataclass(frozen=True)
class Int8Recipe:
    """How the INT8 variant is quantized (QDQ, MinMax calibration in every recipe).

    ``reduce_range``: weights restricted to 7 bits ([-64, 63]). ONNX Runtime's x86 U8S8 kernels
    on CPUs without VNNI (AVX2, and AVX-512 before Cascade Lake) multiply with ``vpmaddubsw``,
    which adds two uint8 x int8 products into a saturating int16: 2 x 255 x 127 = 64,770 overflows
    32,767, 2 x 255 x 64 = 32,640 does not. VNNI (``vpdpbusd``) and ARM64 (``sdot``/``udot``,
    ``smull``) accumulate in 32 bits and never saturate, so there the 7th bit only costs resolution.
    """

    name: str
    description: str
    weight_type: str = "int8"  # "int8" or "uint8"
    activation_type: str = "uint8"  # "uint8" or "int8"
    per_channel: bool = True
    reduce_range: bool = True


INT8_RECIPES = {
    r.name: r
    for r in (
        Int8Recipe(
            "u8s8-rr",
            "uint8 activations, int8 weights in 7 bits (reduce_range), per output channel",
        ),
        Int8Recipe(
            "u8s8",
            "uint8 activations, int8 weights in 8 bits, per output channel (saturates in vpmaddubsw "
            "on x86 without VNNI)",
            reduce_range=False,
        ),
        Int8Recipe(
            "u8u8", "uint8 activations, uint8 weights, per output channel", weight_type="uint8", reduce_range=False
        ),
        Int8Recipe(
            "s8s8", "int8 activations, int8 weights, per output channel", activation_type="int8", reduce_range=False
        ),
        Int8Recipe(
            "u8s8-pt", "uint8 activations, int8 weights in 8 bits, per tensor", per_channel=False, reduce_range=False
        ),
        Int8Recipe(
            "u8s8-rr-pt", "uint8 activations, int8 weights in 7 bits (reduce_range), per tensor", per_channel=False
        ),
    )
}
DEFAULT_INT8_RECIPE = "u8s8-rr"


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


def normalizer_of(proto: onnx.ModelProto) -> Normalizer:
    pre = json.loads(_metadata(proto)["preprocessing"])
    return Normalizer(pre)


def calibration_index(n_train: int, images: int, seed: int) -> np.ndarray:
    """Which training-split images calibrate: ``images`` of them, drawn without replacement with
    ``numpy.random.default_rng(seed)``, sorted."""
    if not 1 <= images <= n_train:
        raise ValueError(f"calibration images must be 1..{n_train}, got {images}")
    return np.sort(np.random.default_rng(seed).choice(n_train, images, replace=False))


def model_size(model: Path) -> tuple[int, int]:
    """The (height, width) a model takes, from its preprocessing metadata."""
    return Preprocessing.parse(json.loads(_metadata(onnx.load(str(model)))["preprocessing"])).size


def write_check_inputs(model: Path) -> Path:
    """``check_inputs.npz`` beside ``model``: CHECK_IMAGES synthetic images (uint8 NHWC at the
    model's input size; export/check_inputs.py says why synthetic) and their seed. The server runs
    them through a variant and FP32 at load (service/inference/precision.py)."""
    images = synthetic_check_images(model_size(model))
    target = Path(model).with_name(CHECK_INPUTS_FILENAME)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npz", delete=False) as f:
        np.savez_compressed(f, images=images, seed=np.int64(CHECK_SEED))
    Path(f.name).chmod(0o644)
    Path(f.name).replace(target)
    return target


def check_agreement(model: Path, variant: Path) -> dict:
    """Top-1 agreement of ``variant`` with ``model`` on the check inputs beside ``model``, here."""
    from service.inference.precision import agreement, load_check_images

    images = load_check_images(model)
    assert images is not None
    x = normalizer_of(onnx.load(str(model)))(images)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (model, variant)]
    found = agreement(sessions[0], sessions[1], x, 64)
    return {"images": len(x), "agreement": found, "threshold": AGREEMENT_THRESHOLD}


def _output_nodes(proto: onnx.ModelProto) -> list[str]:
    outputs = {o.name for o in proto.graph.output}
    return [n.name for n in proto.graph.node if outputs & set(n.output)]


def quantize_int8(
    model: Path, data: str | Path, target: Path, calibration: Calibration, recipe: str = DEFAULT_INT8_RECIPE
) -> dict:
    """Write the INT8 QDQ model to ``target`` (unchecked); returns its ``quantization`` record."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    r = INT8_RECIPES[recipe]
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    proto = onnx.load(str(model))
    train = load_split(data, "train")
    index = calibration_index(len(train), calibration.images, calibration.seed)
    x = normalizer_of(proto)(train.images[index])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name = proto.graph.input[0].name
            self._batches = iter({name: x[i : i + CALIBRATION_BATCH]} for i in range(0, len(x), CALIBRATION_BATCH))

        def get_next(self) -> dict | None:
            return next(self._batches, None)

    excluded = [] if calibration.quantize_output_layer else _output_nodes(proto)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=r.per_channel,
            reduce_range=r.reduce_range,
            activation_type=qtype[r.activation_type],
            weight_type=qtype[r.weight_type],
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
        )
    bits = "7 bits ([-64, 63], reduce_range)" if r.reduce_range else "8 bits"
    return {
        "tool": f"onnxruntime {ort.__version__} quantization.quant_pre_process + quantize_static",
        "recipe": r.name,
        "format": "QDQ",
        "weights": f"{r.weight_type} in {bits}, {'per output channel' if r.per_channel else 'per tensor'}"
        + (", symmetric" if r.weight_type == "int8" else ""),
        "activations": f"{r.activation_type}, per tensor, MinMax ranges",
        "kept_fp32": excluded,
        "calibration": {
            "data": Path(data).name,
            "split": "train (the validation split excluded)",
            "images": int(calibration.images),
            "seed": int(calibration.seed),
            "selection": "numpy.random.default_rng(seed).choice(len(train split), images, replace=False), sorted",
            "index_sha256": hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest(),
        },
    }


def convert_fp16(model: Path, target: Path) -> dict:
    """Write the FP16 model (FP32 input and output) to ``target`` (unchecked); returns its record."""
    from importlib.metadata import version

    from onnxconverter_common.float16 import convert_float_to_float16

    proto = onnx.load(str(model))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = convert_float_to_float16(proto, keep_io_types=True)
    clamped = sum("truncated" in str(w.message) for w in caught)
    onnx.checker.check_model(half, full_check=True)
    onnx.save(half, str(target))
    return {
        "tool": f"onnxconverter-common {version('onnxconverter-common')} float16.convert_float_to_float16",
        "weights": "float16",
        "activations": "float16 (input and output stay float32: keep_io_types)",
        "weights_clamped_to_fp16_range": clamped,
    }


def check_fp16_parity(fp32: Path, fp16: Path, data: str | Path, atol: float = FP16_PARITY_ATOL) -> dict:
    """FP32 and FP16 logits on the first PARITY_IMAGES validation images, CPU provider."""
    images = load_split(data, "val").images[:PARITY_IMAGES]
    x = normalizer_of(onnx.load(str(fp32)))(images)
    runs = []
    for path in (fp32, fp16):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    ref, got = runs
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > atol
    max_diff = float(np.abs(got - ref).max())
    same_argmax = bool((got.argmax(1) == ref.argmax(1))[clear].all())
    print(
        f"fp16 parity on {len(x)} validation images (CPU provider): max |logits diff| = "
        f"{max_diff:.2e} (limit {atol:g}), identical argmax: {same_argmax}"
    )
    result = {
        "images": len(x),
        "max_abs_logit_diff": max_diff,
        "atol": atol,
        "argmax_identical_where_clear": same_argmax,
        "provider": "CPUExecutionProvider",
    }
    if max_diff > atol or not same_argmax:
        raise VariantRejected(f"the fp16 model disagrees with fp32 ({result}); not written")
    return result


def make_variant(
    model: str | Path,
    precision: str,
    data: str | Path,
    calibration: Calibration = Calibration(),
    max_accuracy_drop_pp: float = DEFAULT_MAX_ACCURACY_DROP_PP,
    output: str | Path | None = None,
    out_dir: str | Path | None = None,
    recipe: str = DEFAULT_INT8_RECIPE,
) -> Path:
    """Build, check and write one variant of ``model``; returns its path. Raises VariantRejected
    (nothing written) when its validation top-1 falls more than ``max_accuracy_drop_pp`` below
    the FP32 model's, or (fp16) when it disagrees with FP32. ``out_dir``: also write its
    evaluation (``evaluation.<precision>.json``, the per-class figures the model card shows)."""
    if precision not in VARIANTS:
        raise ValueError(f"unknown variant {precision!r} (one of {', '.join(VARIANTS)})")
    model = Path(model)
    output = Path(output) if output else model.with_name(variant_filename(precision))
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / output.name
        if precision == "int8":
            record = quantize_int8(model, data, candidate, calibration, recipe)
            parity = None
        else:
            record = convert_fp16(model, candidate)
            parity = check_fp16_parity(model, candidate, data)

        measured_on = {"cpu": cpu_features(), "onnxruntime": ort.__version__}
        val = load_split(data, "val")
        base_preds, labels = predict(model, val.images)
        preds, _ = predict(candidate, val.images)
        base = summarize(model, data, "val", val.labels, base_preds, labels)
        result = summarize(candidate, data, "val", val.labels, preds, labels)
        drop_pp = 100 * (base["top1"] - result["top1"])
        agreement = float((preds == base_preds).mean())
        print(
            f"{precision}: validation top-1 {100 * result['top1']:.2f} % vs fp32 {100 * base['top1']:.2f} % "
            f"({-drop_pp:+.2f} pp; margin {max_accuracy_drop_pp:g} pp), top-1 agreement with fp32 "
            f"{100 * agreement:.2f} % of {result['images']} images"
        )
        if drop_pp > max_accuracy_drop_pp:
            raise VariantRejected(
                f"{precision} validation top-1 {100 * result['top1']:.2f} % is {drop_pp:.2f} pp below fp32's "
                f"{100 * base['top1']:.2f} % (allowed: {max_accuracy_drop_pp:g} pp) on CPU "
                f"{describe_cpu(measured_on['cpu'])}; {output} not written"
            )
        # The check the server runs at every load (service/inference/precision.py), run here first.
        write_check_inputs(model)
        check = check_agreement(model, candidate)
        print(
            f"{precision}: top-1 agreement with fp32 on the {check['images']} check inputs "
            f"{100 * check['agreement']:.2f} % (the server needs {100 * AGREEMENT_THRESHOLD:g} %)"
        )
        if check["agreement"] < AGREEMENT_THRESHOLD:
            raise VariantRejected(
                f"{precision} agrees with fp32 on only {100 * check['agreement']:.2f} % of the check inputs "
                f"(the server needs {100 * AGREEMENT_THRESHOLD:g} %); {output} not written"
            )

        proto = onnx.load(str(candidate))
        meta = _metadata(onnx.load(str(model)))
        meta.update(
            {
                "precision": precision,
                "variant_of": json.dumps({"file": model.name, "sha256": sha256_of(model)}),
                "val_top1": f"{result['top1']:.4f}",
                "fp32_val_top1": f"{base['top1']:.4f}",
                "quantization": json.dumps(record),
                "check": json.dumps(check),
                "measured_on": json.dumps(measured_on),
            }
        )
        _set_metadata(proto, meta)
        output.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(proto, str(output))
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, sha256 {sha256_of(output)})")
    if out_dir:
        result.update(
            model=str(output),
            precision=precision,
            fp32_top1=base["top1"],
            max_accuracy_drop_pp=max_accuracy_drop_pp,
            top1_agreement_with_fp32=agreement,
            quantization=record,
            fp16_parity=parity,
            check=check,
            measured_on=measured_on,
        )
        target = Path(out_dir) / f"evaluation.{precision}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {target}")
    return output


def main(args: argparse.Namespace) -> int:
    calibration = Calibration(args.calibration_images, args.calibration_seed, args.quantize_output_layer)
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    try:
        for precision in precisions:
            make_variant(
                args.model,
                precision,
                args.data,
                calibration,
                args.max_accuracy_drop,
                None,
                args.out_dir,
                getattr(args, "recipe", DEFAULT_INT8_RECIPE),
            )
    except (VariantRejected, ValueError) as e:
        print(f"cnnserve quantize: {e}", file=sys.stderr)
        return 1
    return 0


# ---- which recipe: every candidate measured on this machine --------------------------------------
def _time_sessions(sessions: dict, batch_sizes: list[int], rounds: int, seconds: float) -> dict:
    """Median ms per run of every session at every batch size, rounds interleaved."""
    import time

    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal((n, 3, 32, 32), dtype=np.float32) for n in batch_sizes}
    times: dict = {(k, n): [] for k in sessions for n in batch_sizes}
    for r in range(rounds):
        order = [(k, n) for k in sessions for n in batch_sizes]
        for k, n in order if r % 2 == 0 else order[::-1]:
            s = sessions[k]
            feed = {s.get_inputs()[0].name: inputs[n]}
            s.run(None, feed)
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                s.run(None, feed)
                runs += 1
            times[(k, n)].append(1000 * elapsed / runs)
    return {k: {n: float(np.median(times[(k, n)])) for n in batch_sizes} for k in sessions}


def compare_recipes(
    model: str | Path,
    data: str | Path,
    recipes: list[str],
    quantize_output_layer: tuple[bool, ...] = (False,),
    batch_sizes: tuple[int, ...] = (1, 64),
    rounds: int = 5,
    seconds: float = 0.5,
) -> dict:
    """Every INT8 candidate built and measured here against FP32 on the validation split: top-1,
    top-1 agreement with FP32, the same for the exact integer arithmetic a non-saturating CPU
    (VNNI, ARM64) computes (emulated: the QDQ graph run unfused, so ONNX Runtime dequantizes and
    computes in FP32 instead of running its integer kernels), and speed at 1 intra-op thread."""
    model = Path(model)
    val = load_split(data, "val")
    x = normalizer_of(onnx.load(str(model))).__call__(val.images)

    def session(path: Path, fused: bool = True) -> ort.InferenceSession:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not fused:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def top1_of(s: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
        name = s.get_inputs()[0].name
        batches = range(0, len(inputs), 500)
        return np.concatenate([s.run(None, {name: inputs[i : i + 500]})[0].argmax(1) for i in batches])

    def top1(s: ort.InferenceSession) -> np.ndarray:
        return top1_of(s, x)

    base = top1(session(model))
    check_x = normalizer_of(onnx.load(str(model)))(synthetic_check_images(model_size(model)))
    base_check = top1_of(session(model), check_x)
    out: dict = {
        "model": str(model),
        "images": len(x),
        "fp32_top1": float((base == val.labels).mean()),
        "cpu": cpu_features(),
        "onnxruntime": ort.__version__,
        "candidates": [],
    }
    sessions = {"fp32": session(model)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in recipes:
            for qol in quantize_output_layer:
                key = name + ("+fc4" if qol else "")
                path = Path(tmp) / f"{key}.onnx"
                quantize_int8(model, data, path, Calibration(quantize_output_layer=qol), name)
                fused, unfused = session(path), session(path, fused=False)
                preds, exact = top1(fused), top1(unfused)
                check, exact_check = top1_of(fused, check_x), top1_of(unfused, check_x)
                row: dict = {
                    "recipe": key,
                    "description": INT8_RECIPES[name].description + ("; logits layer quantized too" if qol else ""),
                    "top1": float((preds == val.labels).mean()),
                    "agreement": float((preds == base).mean()),
                    "exact_arithmetic_top1": float((exact == val.labels).mean()),
                    "exact_arithmetic_agreement": float((exact == base).mean()),
                    "check_inputs_agreement": float((check == base_check).mean()),
                    "exact_arithmetic_check_inputs_agreement": float((exact_check == base_check).mean()),
                }
                out["candidates"].append(row)
                print(
                    f"{key:12s} top-1 {100 * row['top1']:.2f} % (fp32 {100 * out['fp32_top1']:.2f} %), agreement "
                    f"{100 * row['agreement']:.2f} %; exact arithmetic {100 * row['exact_arithmetic_top1']:.2f} % / "
                    f"{100 * row['exact_arithmetic_agreement']:.2f} %; on the {len(check_x)} check inputs "
                    f"{100 * row['check_inputs_agreement']:.1f} % / "
                    f"{100 * row['exact_arithmetic_check_inputs_agreement']:.1f} %",
                    flush=True,
                )
                sessions[key] = session(path)
        ms = _time_sessions(sessions, list(batch_sizes), rounds, seconds)
    out["timing"] = {"intra_op_threads": 1, "rounds": rounds, "seconds_per_point": seconds, "median_ms": ms}
    for row in out["candidates"]:
        row["speedup"] = {str(n): ms["fp32"][n] / ms[row["recipe"]][n] for n in batch_sizes}
        print(
            f"{row['recipe']:12s} speed-up over fp32 (1 thread): "
            + ", ".join(
                f"batch {n} {ms['fp32'][n]:.3f}/{ms[row['recipe']][n]:.3f} ms = {row['speedup'][str(n)]:.2f}x"
                for n in batch_sizes
            )
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Measure the INT8 recipes on this machine (export.quantize.compare_recipes)"
    )
    parser.add_argument("--model", default="models/cifar10/1/model.onnx")
    parser.add_argument("--data", default="../shared/data/cifar10/cifar10-train-jpeg.tar.gz")
    parser.add_argument("--recipes", default=",".join(INT8_RECIPES))
    parser.add_argument(
        "--with-output-layer", action="store_true", help="also each recipe with the logits layer quantized"
    )
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the result here")
    a = parser.parse_args()
    result = compare_recipes(
        a.model,
        a.data,
        a.recipes.split(","),
        (False, True) if a.with_output_layer else (False,),
        tuple(int(n) for n in a.batch_sizes.split(",")),
        a.rounds,
    )
    result["command"] = "python -m export.quantize " + " ".join(sys.argv[1:])
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.json}")
