"""Can this process run ONNX Runtime's CUDA provider? Asked before any session is created.

ONNX Runtime itself finds out by trying: with no driver or a missing CUDA library it prints its own
coloured error and warnings to stderr and falls back to the CPU. We probe first, with ``ctypes``,
so that a CPU machine never asks for CUDA and the server logs one line that names the cause:
no NVIDIA driver, or the first CUDA/cuDNN library the loader cannot find.

``cuda_available()`` is the public entry point (cached: the answer does not change while the
process runs). ``quiet_onnxruntime()`` keeps ONNX Runtime's own log, which has no Python hook
and writes colour codes even to a file, off stderr unless the log level is DEBUG.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import struct
import sys
from pathlib import Path

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
DRIVER_LIBRARY = "libcuda.so.1"
# cuDNN is opened by the CUDA provider at run time (dlopen), so it is not among the provider
# library's ELF dependencies; onnxruntime-gpu 1.2x-1.3x is built against cuDNN 9.
CUDNN_LIBRARY = "libcudnn.so.9"
NO_DRIVER = "no NVIDIA driver found"

# ONNX Runtime's logger severities.
ORT_VERBOSE, ORT_INFO, ORT_WARNING, ORT_ERROR, ORT_FATAL = range(5)


def _loadable(name: str) -> str | None:
    """None when the dynamic loader can open ``name`` (LD_LIBRARY_PATH, ldconfig's cache), else why not."""
    try:
        ctypes.CDLL(name)
    except OSError as e:
        return str(e)
    return None


def elf_needed(path: str | Path) -> list[str]:
    """The ``DT_NEEDED`` entries (shared libraries a library links against) of a 64-bit
    little-endian ELF file, read from its dynamic section without loading it."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path} is not a 64-bit little-endian ELF file")
    shoff, _, _, _, _, shentsize, shnum, _ = struct.unpack_from("<QIHHHHHH", data, 0x28)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next((s for s in sections if s[1] == 6), None)  # SHT_DYNAMIC
    if dynamic is None:
        return []
    strtab = sections[dynamic[6]]  # sh_link: the dynamic string table
    names = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + value
            names.append(data[start : data.index(b"\0", start)].decode())
    return names


def cuda_libraries() -> list[str]:
    """The CUDA libraries this onnxruntime's CUDA provider needs (its ELF dependencies named
    ``libcu*`` except the driver's ``libcuda.so.1``), then cuDNN."""
    provider = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    try:
        needed = elf_needed(provider)
    except (OSError, ValueError, struct.error):
        needed = []
    return [n for n in needed if n.startswith("libcu") and n != DRIVER_LIBRARY] + [CUDNN_LIBRARY]


@functools.cache
def cuda_available() -> tuple[bool, str]:
    """``(True, "")`` when ONNX Runtime's CUDA provider can run here, else ``(False, reason)``.

    Checks, in order: an NVIDIA driver is visible (a loadable ``libcuda.so.1``; with only
    ``/proc/driver/nvidia/version`` the reason says the library is missing); the onnxruntime
    build has the CUDA provider; every CUDA/cuDNN library
    the provider needs can be loaded. Loading a library that is there has no side effect beyond
    what ONNX Runtime would do next. It does not check that a device is free or which ordinal
    exists: ONNX Runtime reports that itself when the session is created."""
    if sys.platform != "linux":  # pragma: no cover - the probe knows Linux's library names only
        ok = CUDA in ort.get_available_providers()
        return ok, "" if ok else "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    driver_error = _loadable(DRIVER_LIBRARY)
    if driver_error is not None:
        if NVIDIA_DRIVER_VERSION.exists():
            return False, f"the NVIDIA driver is there but {DRIVER_LIBRARY} cannot be loaded ({driver_error})"
        return False, NO_DRIVER
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDA provider (install onnxruntime-gpu)"
    for name in cuda_libraries():
        if _loadable(name) is not None:
            return False, (
                f"CUDA library {name} not found (onnxruntime-gpu {ort.__version__} needs it; add its folder to "
                "LD_LIBRARY_PATH or install the matching NVIDIA wheels)"
            )
    return True, ""


def usable_providers(requested: list[str]) -> tuple[list[str], str | None]:
    """``requested`` without the GPU providers when CUDA cannot run here, and the reason (None
    when nothing was removed). TensorRT runs on top of CUDA, so it goes with it."""
    if CUDA not in requested and TENSORRT not in requested:
        return list(requested), None
    ok, reason = cuda_available()
    if ok:
        return list(requested), None
    return [p for p in requested if p not in (CUDA, TENSORRT)], reason


def onnxruntime_log_severity(log_level: str) -> int:
    """ONNX Runtime's own log goes to stderr with colour codes and has no Python hook, so it is
    kept to fatal errors (its failures reach us as exceptions, which we log); at DEBUG its
    warnings are shown, as it writes them."""
    return ORT_WARNING if log_level == "DEBUG" else ORT_FATAL


def quiet_onnxruntime(log_level: str) -> None:
    """Set ONNX Runtime's process-wide default logger severity (before the first session)."""
    ort.set_default_logger_severity(onnxruntime_log_severity(log_level))


def describe() -> str:
    """One line for people: where CUDA stands on this machine."""
    ok, reason = cuda_available()
    return f"CUDA usable (onnxruntime {ort.__version__})" if ok else f"CUDA not usable: {reason}"


if __name__ == "__main__":  # pragma: no cover - python -m service.inference.devices
    print(describe())
    sys.exit(0 if cuda_available()[0] else 1)


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset), capped by a cgroup CPU quota
    (a container's CPU limit: Kubernetes ``limits.cpu``), rounded up. The node's core count
    would oversubscribe a container."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
