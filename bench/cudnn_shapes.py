"""What a change of batch size costs ONNX Runtime on CUDA, in this process (no server).

For each cuDNN algorithm search mode it times (1) the first run of every batch size 1..64 on a
fresh session, (2) steady runs of one size, and (3) sequences that change size from run to run
the way a dynamic batcher's batches do, against the same sequences padded to one size (what
``--pad-batches`` does). Medians in ms per session.run.

    python bench/cudnn_shapes.py            # needs onnxruntime-gpu and an NVIDIA GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(session, inputs: list[np.ndarray], pad_to: int = 0) -> float:
    times = []
    for x in inputs:
        if pad_to and len(x) < pad_to:
            padded = np.zeros((pad_to, *x.shape[1:]), np.float32)
            padded[: len(x)] = x
            x = padded
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    from service.inference.runtime import CUDA, provider_options, session_options
    from service.settings import Settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "cifar10" / "1" / "model.onnx"))
    ap.add_argument("--modes", default="HEURISTIC,EXHAUSTIVE")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = {n: rng.random((n, 3, 32, 32), dtype=np.float32) for n in range(1, 65)}
    mixed = [x[n] for n in [5, 9, 7, 12, 6, 10, 8, 11] * 25]
    for mode in args.modes.split(","):
        settings = Settings(providers=["cuda"], cudnn_conv_algo_search=mode)
        providers = provider_options(settings)
        session = ort.InferenceSession(
            args.model,
            sess_options=session_options(settings),
            providers=[p for p, _ in providers],
            provider_options=[o for _, o in providers],
        )
        if session.get_providers()[0] != CUDA:
            print(f"cudnn_shapes: the session runs on {session.get_providers()[0]}, not CUDA", file=sys.stderr)
            return 1
        first = {n: timed(session, [x[n]]) for n in range(1, 65)}
        print(
            f"{mode}: first run of each size 1..64: total {sum(first.values()):.0f} ms, "
            f"size 1 (CUDA start) {first[1]:.1f} ms, others median {np.median(list(first.values())[1:]):.2f} ms"
        )
        print(
            f"{mode}: steady, one size: " + ", ".join(f"{n}: {timed(session, [x[n]] * 50):.3f}" for n in (1, 8, 16, 64))
        )
        print(
            f"{mode}: sizes alternating 8/16: {timed(session, [x[8], x[16]] * 50):.3f}; "
            f"mixed 5..12: {timed(session, mixed):.3f}; the same padded to 64: {timed(session, mixed, 64):.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
