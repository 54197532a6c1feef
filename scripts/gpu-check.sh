#!/usr/bin/env bash
# The CUDA path, checked on a machine with an NVIDIA GPU: tests/test_gpu.py (CUDA session vs the
# CPU's answers, the FP16 variant vs FP32, the server on CUDA under gRPC/HTTP load), what a change
# of batch size costs (bench/cudnn_shapes.py), then the CUDA ceiling and the served benchmark
# against it, and FP16 vs FP32 on CUDA (in process and served). CI has no
# GPU; run this where there is one and keep what it writes.
#
# Needs: an NVIDIA driver, the project's environment (pip install -e '.[dev]' brings
# onnxruntime-gpu, built for CUDA 13 and cuDNN 9), and those libraries where the loader finds
# them: the GPU image has them; a pip-only machine can install NVIDIA's cu13 wheels and put their
# lib folders on LD_LIBRARY_PATH.
#
#     scripts/gpu-check.sh [OUTDIR]      # default bench/results/gpu; PYTHON overrides the interpreter
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PYTHON" -c 'import onnxruntime as ort; print("onnxruntime", ort.__version__, ort.get_available_providers())'
    "$PYTHON" bench/cudnn_shapes.py
} 2>&1 | tee "$out/runtime.txt" || status=1
"$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/test_gpu.txt" || status=1
# The same with two front ends and a device executor owning the GPU.
CNNSERVE_TEST_WORKERS=2 "$PYTHON" -m pytest -v -rs -p no:cacheprovider tests/test_gpu.py tests/test_workers.py \
    2>&1 | tee "$out/test_gpu_workers.txt" || status=1
"$PYTHON" bench/ceiling.py --provider cuda --threads 0 --rounds 3 --seconds 0.5 \
    --json "$out/ceiling-cuda.json" --plot "$out/ceiling-cuda.png" 2>&1 | tee "$out/ceiling-cuda.txt" || status=1
"$PYTHON" bench/served.py --provider cuda --protocols grpc,http --batching on --concurrency 1,16,64,256 \
    --rounds 2 --duration 3 --warmup 1 --client-processes 4 \
    --json "$out/served-cuda.json" --plot "$out/served-cuda.png" 2>&1 | tee "$out/served-cuda.txt" || status=1
# The FP16 variant against FP32 on CUDA: in process (padded batch sizes included), then served.
"$PYTHON" bench/ceiling.py --provider cuda --precision fp32,fp16 --threads 0 --batch-sizes 1,64,256 \
    --rounds 3 --seconds 0.5 --json "$out/ceiling-precision-cuda.json" --plot "$out/ceiling-precision-cuda.png" \
    2>&1 | tee "$out/ceiling-precision-cuda.txt" || status=1
"$PYTHON" bench/served.py --provider cuda --precision fp16 --protocols grpc,http --batching on \
    --concurrency 1,64 --rounds 2 --duration 3 --warmup 1 --client-processes 4 \
    --json "$out/served-cuda-fp16.json" --plot "$out/served-cuda-fp16.png" 2>&1 | tee "$out/served-cuda-fp16.txt" \
    || status=1
# Workers (issue 11): --workers auto (front ends + one device executor) against one process, on
# CUDA, side by side; single-image Classify and v2 at c=256, 64-image requests, c=1. Then the
# executor's control path on one core, and the same comparison on this machine's many CPU cores.
"$PYTHON" bench/workers.py --provider cuda --gpu --servers 1,auto --rounds 2 --seconds 4 \
    --json "$out/workers-cuda.json" 2>&1 | tee "$out/workers-cuda.txt" || status=1
"$PYTHON" bench/executor_capacity.py --drivers 4 --json "$out/executor-capacity.json" \
    2>&1 | tee "$out/executor-capacity.txt" || status=1
"$PYTHON" bench/workers.py --provider cpu --rounds 2 --seconds 3 \
    --json "$out/workers-cpu16.json" 2>&1 | tee "$out/workers-cpu16.txt" || status=1
echo "gpu-check: exit $status; results in $out"
exit $status
