"""What a benchmark figure depends on: the machine, its load, and library versions (also used by bench/)."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np


def _package_version(*names: str) -> str | None:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cores_available() -> int | None:
    """CPUs this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info() -> dict:
    """CPU, cores, memory, load, Python and library versions, GPUs."""
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu_model": cpu_model or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "memory_bytes": mem_total,
        "load_average": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": _package_version("onnxruntime-gpu", "onnxruntime"),
        "numpy": _package_version("numpy"),
        "grpcio": _package_version("grpcio"),
        "cnnserve": _package_version("cnnserve"),
        "gpus": _gpus(),
    }


def _gpus() -> list[str] | None:
    """NVIDIA GPUs as nvidia-smi names them (None where there is no nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def spread(values: list[float]) -> dict:
    """min / median / max of a few rounds (None when there are none)."""
    vals = sorted(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not vals:
        return {"min": None, "median": None, "max": None, "n": 0}
    return {"min": vals[0], "median": float(np.median(vals)), "max": vals[-1], "n": len(vals)}
