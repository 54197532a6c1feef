"""What the tracing hooks cost one request, with no server around them (README "Tracing").

    .venv/bin/python bench/tracing_hooks.py            # off, then on at 0, 0.01 and 1

Runs the hooks an HTTP request meets (``traced_http`` around its work, ``current``, ``stage``,
``annotate``, ``event``) 20 000 times in an event loop: first with tracing off, then on (no
exporter, so only the SDK's own work counts) with ``OTEL_TRACES_SAMPLER_ARG`` of 0, 0.01 and 1.
Each ratio runs in a process of its own, as tracing starts once per process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
N = 20000


async def _loop() -> float:
    from starlette.requests import Request

    from service import tracing

    scope = {"type": "http", "method": "POST", "path": "/predict", "query_string": b"",
             "headers": [(b"content-type", b"image/png"), (b"host", b"localhost")]}  # fmt: skip
    request = Request(scope)

    async def work() -> None:
        if tracing.ENABLED:
            tracing.event("admitted", images=1)

    async def one() -> None:
        job = work()
        if tracing.ENABLED:
            job = tracing.traced_http("predict", request, job)
        await job
        if tracing.ENABLED:
            tracing.current()
            tracing.stage("decode", time.monotonic())
            tracing.annotate(model="cifar10")
            tracing.event("computed")

    for _ in range(N // 10):
        await one()
    started = time.perf_counter()
    for _ in range(N):
        await one()
    return (time.perf_counter() - started) / N * 1e6


def child(ratio: str) -> None:
    from service import tracing
    from service.settings import Settings

    off = asyncio.run(_loop())
    if ratio == "off":
        print(f"off: {off:.1f} us a request")
        return
    os.environ.update(OTEL_TRACES_EXPORTER="none", OTEL_TRACES_SAMPLER_ARG=ratio)
    tracing.start(Settings(tracing=True), "bench")
    print(f"on, ratio {ratio}: {asyncio.run(_loop()):.1f} us a request (off in the same process: {off:.1f})")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return 0
    for ratio in ("off", "0", "0.01", "1"):
        subprocess.run([sys.executable, __file__, "--child", ratio], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
