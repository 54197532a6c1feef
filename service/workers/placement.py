"""How many front ends and where the models run (--workers, --executor), from the settings and
the machine: its usable cores and the GPUs CUDA can see."""

from __future__ import annotations

import os
import subprocess

from service.settings import Settings

#: --executor auto on a machine without a GPU. Measured on 2 cores (docs/benchmarks.md): see README.
CPU_AUTO_EXECUTOR = "worker"


def visible_gpus(settings: Settings) -> list[int]:
    """CUDA device ordinals this server may use: none unless CUDA is among the providers and can
    run here (``service.inference.devices.cuda_available``); CUDA_VISIBLE_DEVICES is honoured by the driver."""
    if "CUDAExecutionProvider" not in settings.providers:
        return []
    from service.inference.devices import cuda_available

    if not cuda_available()[0]:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return [0]  # the driver answers but nvidia-smi is absent: at least one device
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # nvidia-smi lists every GPU; CUDA numbers the visible ones from 0
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return list(range(max(1, count)))


def plan(settings: Settings) -> tuple[int, str, list[int]]:
    """(front ends, executor placement, GPU ordinals) for ``settings`` on this machine.

    auto: with a GPU, one device executor per GPU and a front end per remaining core (the GPU
    waits on Python otherwise); on the CPU alone, what measured best on 2 cores: see README."""
    gpus = visible_gpus(settings)
    placement: str = settings.executor
    if placement == "auto":
        placement = "device" if gpus else CPU_AUTO_EXECUTOR
    from service.inference.devices import usable_cores

    cores = usable_cores()
    if settings.workers != "auto":
        workers = int(settings.workers)
    elif placement == "device":
        workers = max(1, min(32, cores - max(1, len(gpus))))
    else:
        workers = max(1, min(32, cores))
    return workers, placement, gpus
