"""The CUDA path on a real NVIDIA GPU: the session really runs on CUDA, agrees with the CPU, and the
server serves gRPC and HTTP from it under concurrent load.

Skipped, with the reason, on a machine without an NVIDIA GPU (CI has none). A machine with a GPU
runs them and fails them if CUDA does not work there. scripts/gpu-check.sh runs them on a lent GPU
machine and records their output (docs/gpu.md).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from service import cli
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.inference.repository import scan
from service.inference.runtime import CPU, CUDA, ModelRuntime
from service.settings import Settings
from tests.conftest import MODEL_PATH, MODEL_REPOSITORY, ServerProcess, distinct_images, png_bytes


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.startswith("GPU ")]


pytestmark = pytest.mark.skipif(
    not _gpus(),
    reason="no NVIDIA GPU here (nvidia-smi lists none): the CUDA path runs on a GPU machine, see scripts/gpu-check.sh",
)

# TF32 and cuDNN's algorithm choice make CUDA's float results differ slightly from the CPU's.
PROBABILITY_TOLERANCE = 5e-3
# FP16 arithmetic on top of that: logits within ~3e-3 of FP32's on the CPU provider (cnnserve quantize).
FP16_PROBABILITY_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def runtimes():
    spec = next(s for s in scan(MODEL_REPOSITORY) if s.path == MODEL_PATH)
    cuda = ModelRuntime(spec, Settings(providers=["cuda"], require_gpu=True, precision="fp32"))
    cpu = ModelRuntime(spec, Settings(providers=["cpu"], precision="fp32"))
    return cuda, cpu


def test_auto_precision_on_cuda_is_fp32_and_fp16_agrees_with_fp32(runtimes):
    """precision auto loads model.onnx on CUDA; the FP16 variant, asked for, runs on CUDA and
    agrees with FP32 on the CPU (its CPU-provider parity is checked by cnnserve quantize)."""
    _, cpu = runtimes
    spec = next(s for s in scan(MODEL_REPOSITORY) if s.path == MODEL_PATH)
    auto = ModelRuntime(spec, Settings(providers=["cuda"], require_gpu=True))
    assert (auto.provider, auto.precision) == (CUDA, "fp32")
    fp16 = ModelRuntime(spec, Settings(providers=["cuda"], require_gpu=True, precision="fp16"))
    assert (fp16.provider, fp16.precision, fp16.path.name) == (CUDA, "fp16", "model.fp16.onnx")
    images = distinct_images(256, seed=4)
    for batch in (1, 7, 64, 256):
        half, full = fp16.run_batch([images[:batch]]), cpu.run_batch([images[:batch]])
        np.testing.assert_allclose(half.probabilities, full.probabilities, atol=FP16_PROBABILITY_TOLERANCE)
        top2 = np.sort(full.probabilities, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * FP16_PROBABILITY_TOLERANCE
        assert np.array_equal(half.order[clear, 0], full.order[clear, 0])


def test_server_serves_the_fp16_variant_on_cuda(runtimes):
    _, cpu = runtimes
    s = ServerProcess("--providers", "cuda", "--require-gpu", "--drain-seconds", "0", precision="fp16")
    try:
        ready = httpx.get(f"{s.http}/readyz").json()
        assert [(m["provider"], m["precision"], m["file"]) for m in ready["models"]] == [
            (CUDA, "fp16", "model.fp16.onnx")
        ]
        assert f'precision="fp16",provider="{CUDA}"' in httpx.get(f"{s.http}/metrics").text  # labels sorted
        config = httpx.get(f"{s.http}/v2/models/cifar10/config").json()["config"]
        assert config["default_model_filename"] == "model.fp16.onnx"
        images = distinct_images(16, seed=6)
        expected = cpu.run_batch([images])
        with grpc.insecure_channel(s.grpc_target) as channel:
            reply = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(encoded=png_bytes(im)) for im in images], top_k=1), timeout=30
            )
        for i, result in enumerate(reply.results):
            got = result.predictions[0]
            assert abs(got.probability - expected.probabilities[i, got.index]) < FP16_PROBABILITY_TOLERANCE
    finally:
        assert s.stop() == 0, s.log


def test_session_runs_on_cuda_and_agrees_with_the_cpu(runtimes):
    cuda, cpu = runtimes
    assert cuda.provider == CUDA and cpu.provider == CPU
    assert cuda.pad_to == Settings().max_batch_size, "auto pads batches on CUDA"
    images = distinct_images(256, seed=3)
    for batch in (1, 7, 64, 256):  # odd and power-of-two sizes; the largest the default max batch
        on_gpu, on_cpu = cuda.run_batch([images[:batch]]), cpu.run_batch([images[:batch]])
        np.testing.assert_allclose(on_gpu.probabilities, on_cpu.probabilities, atol=PROBABILITY_TOLERANCE)
        # Top-1 agrees wherever the CPU's answer is not a near-tie.
        top2 = np.sort(on_cpu.probabilities, axis=1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * PROBABILITY_TOLERANCE
        assert np.array_equal(on_gpu.order[clear, 0], on_cpu.order[clear, 0])


def test_server_on_cuda_serves_grpc_and_http_under_load(runtimes, tmp_path):
    _, cpu = runtimes
    s = ServerProcess("--providers", "cuda", "--require-gpu", "--drain-seconds", "0")
    try:
        ready = httpx.get(f"{s.http}/readyz").json()
        assert [(m["provider"], m["precision"]) for m in ready["models"]] == [(CUDA, "fp32")]
        assert f"on {CUDA}, batches padded to 64" in s.log
        assert f'provider="{CUDA}"' in httpx.get(f"{s.http}/metrics").text

        images = distinct_images(16, seed=5)
        expected = cpu.run_batch([images])
        with grpc.insecure_channel(s.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            reply = stub.Classify(
                pb.ClassifyRequest(images=[pb.Image(encoded=png_bytes(im)) for im in images], top_k=3), timeout=30
            )
            # 64 concurrent callers: batches form on the GPU and every answer comes back.
            with ThreadPoolExecutor(64) as pool:
                replies = list(
                    pool.map(
                        lambda im: stub.Classify(
                            pb.ClassifyRequest(images=[pb.Image(encoded=png_bytes(im))]), timeout=30
                        ),
                        list(images) * 8,
                    )
                )
        for i, result in enumerate(reply.results):
            assert result.predictions[0].index == expected.order[i, 0]
            assert abs(result.predictions[0].probability - expected.ranked_probabilities[i][0]) < PROBABILITY_TOLERANCE
        assert [r.results[0].predictions[0].index for r in replies] == [int(c) for c in expected.order[:, 0]] * 8

        r = httpx.post(
            f"{s.http}/predict?top_k=1", content=png_bytes(images[0]), headers={"Content-Type": "image/png"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["predictions"][0]["label"] == expected.ranked_labels[0][0]

        report = tmp_path / "loadtest.json"
        rc = cli.main(
            [
                "loadtest",
                "--quiet",
                "--model-file",
                str(MODEL_PATH),
                "--target",
                "grpc",
                "--address",
                s.grpc_target,
                "--metrics-address",
                f"127.0.0.1:{s.http_port}",
                "--concurrency",
                "64",
                "--duration",
                "2",
                "--warmup",
                "0.5",
                "--json",
                str(report),
                "--fail-on-error",
            ]
        )
        summary = json.loads(report.read_text())
        assert rc == 0 and summary["summary"]["errors"] == 0 and summary["summary"]["ok"] > 0
        assert summary["server"]["batch_size_mean"] > 1 and summary["server_warnings"] == []
    finally:
        assert s.stop() == 0, s.log
