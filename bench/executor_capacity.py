"""The device executor's control path on one core, with a synthetic driver.

The real executor (``service.workers.executor.Executor``: its I/O thread, queue, batch formation,
deadline and cancellation checks, gathers from the slabs, softmax and ranking, scatters, DONE
messages, counters, metrics and statistics) runs pinned to one core with a model that costs
nothing (``NullRuntime``: zeros), so what is measured is everything the executor adds per
request. Driver processes on the other cores play front ends: each keeps ``--window`` one-image
requests outstanding and hands them over ``--per-message`` to a message, as front ends do when
many requests arrive in one event-loop iteration.

Prints requests/s completed, the executor's CPU use over the run (from /proc), and requests per
executor core-second: the capacity of one core. Target: >= 50,000 requests/s.

    .venv/bin/python bench/executor_capacity.py                      # 8, 64 and 256 per message
    .venv/bin/python bench/executor_capacity.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.inference.repository import ModelSpec  # noqa: E402
from service.metrics import ModelStats  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.workers import shared_memory  # noqa: E402

CLASSES = 10
SHAPE = [-1, 3, 32, 32]


class NullRuntime:
    """A model that costs nothing: what remains is the executor's own work."""

    def __init__(self, spec: ModelSpec) -> None:
        self.name, self.version, self.provider, self.pad_to = spec.name, spec.version, "null", 0
        self.precision, self.path = "fp32", Path("-")
        self.input_shape = SHAPE
        self.labels = [f"class{i}" for i in range(CLASSES)]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "preprocessing": {"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3},
            "input_name": "input",
            "input_shape": self.input_shape,
            "output_name": "logits",
            "provider": self.provider,
            "pad_to": 0,
            "precision": "fp32",
            "path": "-",
        }

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), CLASSES), np.float32)


def executor_process(settings_json: str, shape: dict, cpu: int) -> None:
    from service.workers.executor import Executor

    os.sched_setaffinity(0, {cpu})
    table = shared_memory.ControlTable(shared_memory.TableShape(**shape))
    executor = Executor(Settings.model_validate_json(settings_json), table, 0, [ModelSpec("null", "1", Path("-"))])
    executor.load(NullRuntime)
    executor.serve(shared_memory.executor_socket(Path(shape["path"]).parent, 0))


def driver_process(
    shape: dict, index: int, cpus: set[int], per_message: int, window: int, seconds: float, results
) -> None:
    os.sched_setaffinity(0, cpus)
    run_dir = Path(shape["path"]).parent
    table = shared_memory.ControlTable(shared_memory.TableShape(**shape))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    while True:
        try:
            sock.connect(shared_memory.executor_socket(run_dir, 0))
            break
        except OSError:
            time.sleep(0.05)
    sock.recv(shared_memory.MAX_MESSAGE_BYTES)  # the models
    slots = window + per_message
    slabs = shared_memory.Slabs(run_dir / f"driver-{index}.slab", slots, 3 * 32 * 32, CLASSES, create=True)
    slabs.inputs[:] = np.random.default_rng(index).random(slabs.inputs.shape, np.float32)
    sock.send(shared_memory.MSG_HELLO + orjson.dumps({"frontend": index, **slabs.describe()}))
    records = np.zeros(per_message, shared_memory.SUBMIT)
    next_id, outstanding, done, slot = 1, 0, 0, 0
    started = time.monotonic()
    until = started + seconds
    while time.monotonic() < until:
        while outstanding + per_message <= window:
            records["request"] = np.arange(next_id, next_id + per_message)
            records["slot"] = (np.arange(per_message) + slot) % slots
            next_id += per_message
            slot = (slot + per_message) % slots
            sock.send(shared_memory.MSG_SUBMIT + records.tobytes())
            table.submitted[index, 0] += per_message
            outstanding += per_message
        message = sock.recv(shared_memory.MAX_MESSAGE_BYTES)
        n = (len(message) - 1) // shared_memory.DONE.itemsize
        outstanding -= n
        done += n
    results.put((index, done, time.monotonic() - started))
    sock.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    per_message: int, drivers: int, window: int, seconds: float, executor_cpu: int, driver_cpus: set[int]
) -> dict:
    run_dir = shared_memory.make_run_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "metrics")
    settings = Settings(max_batch_size=64, max_queue_size=1 << 20, providers=["cpu"])
    shape = shared_memory.TableShape(str(run_dir / "control"), 1, drivers, 1, ModelStats.width(64))
    shared_memory.ControlTable(shape, create=True)
    ctx = multiprocessing.get_context("spawn")
    executor = ctx.Process(target=executor_process, args=(settings.model_dump_json(), shape.__dict__, executor_cpu))
    executor.start()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=driver_process, args=(shape.__dict__, i, driver_cpus, per_message, window, seconds, results))
        for i in range(drivers)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)  # connected and warm
    cpu0, t0 = cpu_seconds(executor.pid), time.monotonic()
    outcome = [results.get(timeout=seconds + 60) for _ in procs]
    cpu1, t1 = cpu_seconds(executor.pid), time.monotonic()
    for p in procs:
        p.join()
    executor.kill()
    executor.join()
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    rate = sum(done for _, done, _ in outcome) / max(elapsed for *_, elapsed in outcome)
    busy = (cpu1 - cpu0) / (t1 - t0)
    return {
        "per_message": per_message,
        "drivers": drivers,
        "window": window,
        "requests_per_s": rate,
        "executor_cpu": busy,
        "requests_per_core_s": rate / max(busy, 1e-9),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-message", default="8,64,256", help="requests handed over per message (default 8,64,256)")
    ap.add_argument("--drivers", type=int, default=1, help="driver processes (default 1)")
    ap.add_argument("--window", type=int, default=1024, help="outstanding requests per driver (default 1024)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one short round at 64 per message")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    executor_cpu, driver_cpus = cores[0], set(cores[1:]) or {cores[0]}
    sizes = [64] if args.quick else [int(v) for v in args.per_message.split(",")]
    rounds, seconds = (1, 1.0) if args.quick else (args.rounds, args.seconds)
    rows = []
    for r in range(rounds):
        for k in sizes:
            row = measure(k, args.drivers, max(args.window, 2 * k), seconds, executor_cpu, driver_cpus)
            row["round"] = r
            rows.append(row)
            print(
                f"round {r} per_message={k:4d}: {row['requests_per_s']:9.0f} requests/s, executor CPU "
                f"{row['executor_cpu']:.2f} core -> {row['requests_per_core_s']:9.0f} requests per core-second",
                flush=True,
            )
    print(f"executor on core {executor_cpu}, driver(s) on {sorted(driver_cpus)}")
    for k in sizes:
        per_core = sorted(row["requests_per_core_s"] for row in rows if row["per_message"] == k)
        rates = sorted(row["requests_per_s"] for row in rows if row["per_message"] == k)
        print(
            f"per_message={k:4d}: requests/s min {rates[0]:.0f} median {rates[len(rates) // 2]:.0f}; per "
            f"executor core-second min {per_core[0]:.0f} median {per_core[len(per_core) // 2]:.0f} "
            f"({'PASS' if per_core[len(per_core) // 2] >= 50_000 else 'MISS'} >= 50,000)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
