"""CUDA probing before ONNX Runtime is asked for it: one line of ours, none of ONNX Runtime's noise."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import onnxruntime as ort

from service.inference import devices
from tests.conftest import ROOT, ServerProcess, wait_until

ORT_NOISE = re.compile(r"\[[EW]:onnxruntime|\x1b\[")


def test_provider_library_dependencies_are_read_from_its_elf_header():
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    needed = devices.elf_needed(provider)
    assert "libcuda.so.1" in needed and any(n.startswith("libcudart.so.") for n in needed)
    libraries = devices.cuda_libraries()
    assert "libcuda.so.1" not in libraries and libraries[-1] == devices.CUDNN_LIBRARY
    assert "libc.so.6" in devices.elf_needed(Path(ort.__file__).parent / "capi" / "libonnxruntime.so.1.31.1")


def test_default_providers_log_one_line_that_names_the_cause():
    """The README's first command (providers cuda,cpu) on this machine: stderr is a pipe, as in a
    container's log, and must hold our one line about CUDA and nothing of ONNX Runtime's."""
    s = ServerProcess("--providers", "cuda,cpu", "--drain-seconds", "0")
    try:
        provider = httpx.get(f"{s.http}/readyz").json()["models"][0]["provider"]
    finally:
        assert s.stop() == 0, s.log
    assert not ORT_NOISE.search(s.log), s.log
    cuda_lines = [l for l in s.log.splitlines() if "running on the CPU" in l]
    if not devices.NVIDIA_DRIVER_VERSION.exists() and devices._loadable(devices.DRIVER_LIBRARY) is not None:
        assert cuda_lines == [l for l in s.log.splitlines() if "WARNING" in l]
        assert len(cuda_lines) == 1 and cuda_lines[0].endswith("no NVIDIA driver found: running on the CPU"), s.log
        assert provider == "CPUExecutionProvider"
    elif provider == "CUDAExecutionProvider":
        assert cuda_lines == [], s.log
    else:  # a driver without some CUDA library: the line names it
        assert len(cuda_lines) == 1 and re.search(r"CUDA library lib\S+\.so\.\d+ not found", cuda_lines[0]), s.log


def test_json_log_format_applies_to_the_cuda_line():
    s = ServerProcess("--providers", "cuda,cpu", "--log-format", "json", "--drain-seconds", "0", wait_ready=False)
    try:
        assert wait_until(lambda: httpx.get(f"{s.http}/readyz").status_code == 200, timeout=60), s.log
    finally:
        assert s.stop() == 0, s.log
    docs = [json.loads(line) for line in s.log.splitlines() if line.strip()]  # every line is our JSON
    assert not ORT_NOISE.search(s.log)
    if not devices.cuda_available()[0]:
        assert [d["message"] for d in docs if d["level"] == "WARNING"] == [
            f"{devices.cuda_available()[1]}: running on the CPU"
        ]


def test_require_gpu_refuses_with_the_cause_where_cuda_cannot_run():
    ok, reason = devices.cuda_available()
    if ok:
        return  # a GPU machine: tests/test_gpu.py checks that CUDA really runs
    out = subprocess.run(
        # providers left at their default: cuda,cpu
        [sys.executable, "-m", "service.cli", "serve", "--http-port", "0", "--grpc-port", "0", "--require-gpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert f"{reason}; refusing to start because require_gpu is set" in out.stderr
    assert not ORT_NOISE.search(out.stderr)
