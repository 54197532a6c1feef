"""Which precision variant answers, decided where the server runs: checked against FP32 and timed.

A reduced-precision variant (``model.int8.onnx``, ``model.fp16.onnx``) is only as good as the
integer or half-precision kernels of the machine that runs it. ONNX Runtime's x86 U8S8 kernels on
CPUs without VNNI multiply with ``vpmaddubsw``, whose 16-bit pair sums saturate: an INT8 model
quantized with 8-bit weights that is exact on a VNNI CPU loses 5 points of top-1 on an AVX2-only
one (issue 16; models/cifar10/README.md). So before a model version is marked ready:

1. **Check.** The variant and the FP32 model both run the version's check inputs
   (``check_inputs.npz`` beside ``model.onnx``: seeded synthetic images with the statistics of
   photographs, written by ``cnnserve quantize``; export/check_inputs.py) on this machine;
   their top-1 answers must agree on at least ``AGREEMENT_THRESHOLD`` of them. Failing that,
   one log line names the variant, the agreement found and the CPU's features, and FP32 is
   served instead (``auto``), or the server refuses to start (the variant asked for
   explicitly: it would answer wrongly more often than it promises).
2. **Time** (``auto`` only). Where the check passes, both sessions run batch 1 and
   ``max_batch_size`` in a few interleaved rounds; the variant answers only where it is faster
   at both, the batch sizes this server forms when idle and under load.

The outcome (:class:`PrecisionChoice`) is logged and reported by ``/readyz``, the
``cnnserve_model_info`` metric and the v2 model configuration. What it adds to start-up (the
variant's session, 2 x 256 check images, 3 timing rounds) is a few hundred ms of compute: 0.7 s
measured on the 2-core EPYC at load average ~4, 1.0-1.4 s at load average ~12 (``seconds``).
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger("cnnserve.precision")

CHECK_INPUTS_FILENAME = "check_inputs.npz"
#: Top-1 agreement with FP32 on the check inputs a variant needs to answer, measured on an
#: AVX2-only EPYC (cnnserve quantize; export/check_inputs.py). On the 256 check images the shipped
#: INT8 recipe agrees on 97.7 % (6 images; 99.1 % of the 5,000 validation images), FP16 on 100 %;
#: the old INT8 recipe where it saturates (AVX2, no VNNI) on 87.1 % (33 images; 87.9 % of the
#: validation images). 95 % lets 12 of 256 change, twice what the shipped recipe moves (a kernel
#: that rounds differently can move an image that sits on a class boundary), and refuses 13 or
#: more, under half of what saturation moves.
AGREEMENT_THRESHOLD = 0.95
#: Interleaved timing rounds per batch size (median taken), and runs per round at batch 1.
TIMING_ROUNDS = 3
RUNS_AT_BATCH_1 = 5

#: The /proc/cpuinfo flags that decide which integer kernels ONNX Runtime's MLAS runs. x86-64:
#: avx2 (U8S8 with vpmaddubsw: saturating), avx512bw (the same, wider), avx512_vnni / avx_vnni
#: (vpdpbusd: 32-bit sums, exact), amx_int8; ARM64: asimddp (sdot/udot), i8mm (smmla/usmmla),
#: both exact.
CPU_FEATURE_FLAGS = (
    "sse4_1",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU model, its architecture, the CPU_FEATURE_FLAGS it has (``/proc/cpuinfo``) and
    whether ONNX Runtime's U8S8 kernels can saturate on it (x86-64 without VNNI)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model: str | None = None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    arch = platform.machine().lower()
    x86 = "sse2" in flags if flags else arch in ("x86_64", "amd64", "i686", "i386")
    return {
        "model": model or platform.processor() or None,
        "arch": arch,
        "flags": [f for f in CPU_FEATURE_FLAGS if f in flags],
        "u8s8_can_saturate": bool(x86 and not VNNI_FLAGS & flags),
    }


def describe_cpu(cpu: dict[str, Any]) -> str:
    """``AMD EPYC 7B12 (avx2 fma; no VNNI)``: the model and the flags that matter, in a few words."""
    flags = " ".join(cpu["flags"][1:] if cpu["flags"][:1] == ["sse4_1"] else cpu["flags"]) or "no listed flags"
    note = "; no VNNI" if cpu.get("u8s8_can_saturate") else ""
    return f"{cpu.get('model') or cpu.get('arch')} ({flags}{note})"


def check_inputs_path(model_path: Path) -> Path:
    return Path(model_path).with_name(CHECK_INPUTS_FILENAME)


def load_check_images(model_path: Path) -> np.ndarray | None:
    """The uint8 [N,H,W,3] check images beside ``model_path``, or None where there are none."""
    path = check_inputs_path(model_path)
    if not path.is_file():
        return None
    with np.load(path) as npz:
        images: np.ndarray = npz["images"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise ValueError(f"{path}: 'images' must be uint8 [N,H,W,3], got {images.dtype} {list(images.shape)}")
    return images


#: Why a precision answers (PrecisionChoice.reason).
REASONS = {
    "asked": "the precision was asked for",
    "passed": "the variant passed its check",
    "unchecked": "no check inputs: the variant answers unchecked",
    "faster": "the variant passed its check and is faster at every batch size timed",
    "slower": "the variant passed its check but is not faster here",
    "check-failed": "the variant disagrees with fp32 here",
    "no-check-inputs": "no check inputs: a variant is not chosen unchecked",
    "absent": "no variant for this provider in the version folder",
    "provider": "auto uses no variant on this provider",
}


@dataclass
class PrecisionChoice:
    """Why the variant that answers was chosen, with the figures measured here."""

    requested: str  # the precision setting: auto, fp32, int8, fp16
    precision: str  # what answers
    reason: str  # a key of REASONS
    candidate: str | None = None  # the variant checked (None: none was)
    check_images: int = 0
    check_agreement: float | None = None  # top-1 agreement with FP32 on the check inputs
    threshold: float = AGREEMENT_THRESHOLD
    # batch size -> (fp32 ms, candidate ms) per run, medians, and the candidate's speed-up
    timing: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=cpu_features)
    seconds: float = 0.0  # what the check and the timing cost at start-up

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: the choice and the figures behind it."""
        parts = [f"precision {self.requested} -> {self.precision} ({REASONS[self.reason]})"]
        if self.check_agreement is not None:
            parts.append(
                f"{self.candidate} top-1 agreement with fp32 {100 * self.check_agreement:.1f} % of "
                f"{self.check_images} check images (threshold {100 * self.threshold:g} %)"
            )
        if self.timing:
            parts.append(
                f"{self.candidate} vs fp32: "
                + ", ".join(f"{t['speedup']:.2f}x at batch {n}" for n, t in self.timing.items())
            )
        parts.append(f"CPU {describe_cpu(self.cpu)}")
        return "; ".join(parts)


def top1(session: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def agreement(fp32: ort.InferenceSession, variant: ort.InferenceSession, x: np.ndarray, batch: int) -> float:
    """Top-1 agreement of ``variant`` with ``fp32`` on the normalised inputs ``x``."""
    return float((top1(fp32, x, batch) == top1(variant, x, batch)).mean())


def time_pair(
    fp32: ort.InferenceSession, variant: ort.InferenceSession, x: np.ndarray, batch_sizes: list[int]
) -> dict[str, dict[str, float]]:
    """Median ms per run of both sessions at each batch size, rounds interleaved (fp32 first in
    even rounds, the variant first in odd ones), on rows of ``x`` (repeated up to the size)."""
    name = fp32.get_inputs()[0].name
    feeds = {n: {name: np.resize(x, (n, *x.shape[1:]))} for n in batch_sizes}
    times: dict[tuple[int, int], list[float]] = {(n, k): [] for n in batch_sizes for k in (0, 1)}
    sessions = (fp32, variant)
    for r in range(TIMING_ROUNDS):
        for n in batch_sizes:
            runs = RUNS_AT_BATCH_1 if n == 1 else 1
            for k in (0, 1) if r % 2 == 0 else (1, 0):
                start = time.perf_counter()
                for _ in range(runs):
                    sessions[k].run(None, feeds[n])
                times[(n, k)].append(1000 * (time.perf_counter() - start) / runs)
    out = {}
    for n in batch_sizes:
        a, b = float(np.median(times[(n, 0)])), float(np.median(times[(n, 1)]))
        out[str(n)] = {"fp32_ms": round(a, 4), "variant_ms": round(b, 4), "speedup": round(a / b, 3)}
    return out
