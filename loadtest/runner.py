"""Run one load test: inputs, the probe, one or several client processes started together, the
metrics monitor; returns the report (``loadtest.report.build_report``)."""

from __future__ import annotations

import asyncio
import importlib.util
import resource

from loadtest.config import LoadConfig, LoadTestError, now
from loadtest.inputs import prepare_inputs
from loadtest.machine import load_average
from loadtest.metrics import Monitor
from loadtest.payloads import build_payloads
from loadtest.probe import check_target
from loadtest.report import build_report
from loadtest.worker import Worker, cpu_seconds


def _loop_runner(wanted: bool):
    """uvloop.run when uvloop is wanted and installed, else asyncio.run; and the loop's name."""
    if wanted:
        try:
            import uvloop

            return uvloop.run, "uvloop"
        except (ImportError, AttributeError):
            pass
    return asyncio.run, "asyncio"


def _split(total: float | int | None, parts: int, index: int, integer: bool = True):
    if total is None:
        return None
    if integer:
        return total // parts + (1 if index < total % parts else 0)
    return total / parts


def _worker_for(cfg: LoadConfig, index: int, images: list[bytes], tensor, counters) -> Worker:
    p = cfg.processes
    return Worker(
        cfg,
        index,
        concurrency=_split(cfg.concurrency, p, index),
        rate=_split(cfg.rate, p, index, integer=False),
        requests=_split(cfg.requests, p, index),
        images=images,
        tensor=tensor,
        counters=counters,
    )


def _child(cfg: LoadConfig, index: int, images: list[bytes], tensor, counters, ready_q, result_q, go, start) -> None:
    """Entry point of a client process (spawned): set up, report ready, wait for the common start."""
    runner, _ = _loop_runner(cfg.uvloop)

    async def main() -> dict:
        worker = _worker_for(cfg, index, images, tensor, counters)
        try:
            await worker.setup()
        except BaseException as e:
            ready_q.put((index, f"client set-up failed: {type(e).__name__}: {e}"))
            raise
        ready_q.put((index, None))
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        if start.value < 0:
            await worker.close()
            return {"index": index, "aborted": True}
        try:
            return await worker.run(start.value)
        finally:
            await worker.close()

    try:
        result = runner(main())
    except BaseException as e:
        result = {"index": index, "error": f"{type(e).__name__}: {e}"}
    result_q.put(result)


def run(cfg: LoadConfig) -> dict:
    """Run one load test and return its report (see ``format_report``). Raises LoadTestError when
    nothing could be measured; ValueError for a bad configuration."""
    cfg.validate()
    if cfg.http_client == "aiohttp" and cfg.protocol == "http" and importlib.util.find_spec("aiohttp") is None:
        raise LoadTestError("--http-client aiohttp needs aiohttp: pip install 'cnnserve[loadtest]'")
    if cfg.duration is None and cfg.requests is None:
        cfg.duration = 10.0
    wall_start, cpu_start = now(), cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN)
    load_before = load_average()
    images, tensor, info = prepare_inputs(cfg)
    k = cfg.images_per_request
    first = build_payloads(cfg, images[:k], None if tensor is None else tensor[:k], 0)[0]
    probe = check_target(cfg, first)
    info["check"] = probe.summary

    if cfg.processes == 1:
        counters = [[0.0, 0.0, 0.0]]
        runner, loop_kind = _loop_runner(cfg.uvloop)
        monitor_box: list[Monitor] = []

        async def single() -> list[dict]:
            worker = _worker_for(cfg, 0, images, tensor, counters[0])
            try:
                await worker.setup()
            except Exception as e:
                raise LoadTestError(f"client set-up failed: {type(e).__name__}: {e}") from None
            start = now() + 0.05
            monitor = Monitor(cfg, counters, start, probe.model)
            monitor_box.append(monitor)
            monitor.start()
            try:
                return [await worker.run(start)]
            finally:
                await worker.close()

        try:
            results = runner(single())
        finally:
            for m in monitor_box:
                m.finish()
        monitor = monitor_box[0]
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        counters = [ctx.RawArray("d", 3) for _ in range(cfg.processes)]
        ready_q, result_q, go, start_value = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.RawValue("d", -1.0)
        procs = [
            ctx.Process(
                target=_child,
                name=f"loadtest-{i}",
                daemon=True,
                args=(cfg, i, images, tensor, counters[i], ready_q, result_q, go, start_value),
            )
            for i in range(cfg.processes)
        ]
        for p in procs:
            p.start()
        loop_kind = _loop_runner(cfg.uvloop)[1]
        problems = []
        try:
            for _ in procs:
                index, problem = ready_q.get(timeout=120)
                if problem:
                    problems.append(f"process {index}: {problem}")
        except Exception as e:
            problems.append(f"client processes did not start: {type(e).__name__}")
        if problems:
            go.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            raise LoadTestError("; ".join(problems))
        start = now() + 0.1
        start_value.value = start
        monitor = Monitor(cfg, counters, start, probe.model)
        monitor.start()
        go.set()
        results = []
        limit = cfg.warmup + (cfg.duration or 0) + (cfg.timeout if cfg.requests else 0) + 120
        try:
            for _ in procs:
                results.append(result_q.get(timeout=limit if cfg.duration else None))
        finally:
            monitor.finish()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise LoadTestError("client process failed: " + "; ".join(failed))
        results.sort(key=lambda r: r["index"])

    wall = now() - wall_start
    cpu_run = cpu_seconds() + cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_start
    return build_report(cfg, results, monitor, probe, info, loop_kind, wall, cpu_run, load_before)
