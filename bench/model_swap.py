"""A new model version dropped into a poll-mode repository while callers keep the server busy:
how long until it answers, and whether any request failed (issue 20's done-when).

The server runs as shipped (``--workers 2 --executor device``: two front ends and a device
executor) on a copy of the bundled model, in ``--model-control-mode poll``. ``--callers``
asyncio callers in this process (a quarter each: HTTP v2 infer, HTTP /predict, gRPC v2
ModelInfer, gRPC Classify) loop without pause; each round, a new version (the bundled version
folder, variants and check images included, so the executor's precision check runs) is written
under a hidden name and renamed into place, as README asks of a deploy pipeline. The version
policy is latest 1, so each round swaps the served version.

Per round: drop → first answer naming the new version, against what the poller allows: the poll
interval, its settle look (it reads a changed folder twice, ``min(1 s, interval)`` apart, so a
half-written file is never loaded) and the load time the executor logs (load, warm-up, precision
check). Over the run: answers by version, failures (must be 0).

    python -m bench.model_swap --callers 64 --poll-seconds 2 --rounds 3 --json bench/results/model-swap.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import tritonclient.grpc.aio as tgrpc_aio
from PIL import Image
from tritonclient.grpc import InferInput

from bench.serverproc import MODEL_REPOSITORY, ServerProcess
from loadtest.machine import machine_info
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc

KINDS = ("http-v2", "predict", "grpc-v2", "classify")
LOADED = re.compile(r"^(\S+ \S+) INFO cnnserve\.executor: loaded cifar10/(\d+) from .* in ([0-9.]+)s", re.M)
CHANGED = re.compile(r"^(\S+ \S+) INFO cnnserve\.model_control: model cifar10 changed in the repository", re.M)
SEEN = re.compile(r"^(\S+ \S+) INFO cnnserve\.model_control: loaded cifar10/(\d+) from", re.M)
SWAPPED = re.compile(r"^(\S+ \S+) INFO cnnserve\.model_control: model cifar10 serves versions (\d+) \(every", re.M)


def log_time(stamp: str) -> float:
    """A log line's wall-clock time (``2026-12-03 11:27:15,235``) as seconds since the epoch."""
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000


class Callers:
    """``n`` callers in a loop until stopped; every answer's (monotonic time, version), every failure."""

    def __init__(self, server: ServerProcess, n: int, image: bytes) -> None:
        self.server, self.n, self.image = server, n, image
        self.answers: list[tuple[float, str]] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stopping = asyncio.Event()
        self.body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}

    async def run(self) -> None:
        s = self.server
        async with (
            httpx.AsyncClient(base_url=s.http, timeout=60, limits=httpx.Limits(max_connections=self.n)) as http,
            grpc.aio.insecure_channel(s.grpc_target) as channel,
        ):
            v2 = tgrpc_aio.InferenceServerClient(s.grpc_target)
            classify = pb_grpc.ClassifierStub(channel).Classify
            try:
                await asyncio.gather(*(self._caller(KINDS[i % len(KINDS)], http, v2, classify) for i in range(self.n)))
            finally:
                await v2.close()

    async def _caller(self, kind: str, http: httpx.AsyncClient, v2: tgrpc_aio.InferenceServerClient, classify) -> None:
        tensor = InferInput("input", [1, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if kind == "http-v2":
                    r = await http.post("/v2/models/cifar10/infer", json=self.body)
                    r.raise_for_status()
                    version = r.json()["model_version"]
                elif kind == "predict":
                    r = await http.post("/predict", files=[("file", ("a.png", self.image, "image/png"))])
                    r.raise_for_status()
                    version = r.json()["model_version"]
                elif kind == "grpc-v2":
                    version = (await v2.infer("cifar10", [tensor], client_timeout=60)).get_response().model_version
                else:
                    reply = await classify(pb.ClassifyRequest(images=[pb.Image(encoded=self.image)]), timeout=60)
                    version = reply.model_version
                done = time.monotonic()
                self.answers.append((done, version))
                self.latencies.append(done - started)
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.failures.append(f"{kind}: {type(e).__name__}: {e}"[:300])


def drop_version(model_dir: Path, version: int) -> None:
    """Copy under a hidden name, then rename into place (README: what a deploy pipeline must do)."""
    staging = model_dir / f".{version}.tmp"
    shutil.copytree(MODEL_REPOSITORY / "cifar10" / "1", staging)
    os.rename(staging, model_dir / str(version))


async def measure(args: argparse.Namespace, repository: Path) -> dict:
    model_dir = repository / "cifar10"
    drop_version(model_dir, 1)
    (model_dir / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    server = ServerProcess(
        "--workers", "2", "--executor", "device", "--model-control-mode", "poll",
        "--repository-poll-seconds", str(args.poll_seconds), "--drain-seconds", "0",
        model_repository=repository, timeout=300,
    )  # fmt: skip
    rounds = []
    try:
        image = io.BytesIO()
        Image.new("RGB", (32, 32), (90, 90, 90)).save(image, format="PNG")
        callers = Callers(server, args.callers, image.getvalue())
        running = asyncio.create_task(callers.run())
        await asyncio.sleep(args.warm_seconds)
        for r in range(args.rounds):
            version = str(2 + r)
            dropped, dropped_wall = time.monotonic(), time.time()
            await asyncio.to_thread(drop_version, model_dir, int(version))
            while not any(v == version for _, v in callers.answers[-4 * args.callers :]):
                if time.monotonic() - dropped > 120 or running.done():
                    raise RuntimeError(f"version {version} did not answer within 120 s:\n{server.log[-3000:]}")
                await asyncio.sleep(0.01)
            first = min(t for t, v in callers.answers if v == version)
            await asyncio.sleep(args.hold_seconds)
            older = [t for t, v in callers.answers if v != version and int(v) < int(version)]
            rounds.append({"version": version, "dropped_wall": dropped_wall,
                           "drop_to_first_answer_s": round(first - dropped, 3),
                           "older_answers_after_first_s": round(max(older) - first, 3) if older else 0.0})  # fmt: skip
        callers.stopping.set()
        await running
    finally:
        exit_code = server.stop()
    log = server.log
    loads = {m.group(2): (log_time(m.group(1)), float(m.group(3))) for m in LOADED.finditer(log)}
    for entry in rounds:
        version, dropped_wall = entry["version"], entry.pop("dropped_wall")
        loaded_wall, entry["load_s"] = loads.get(version, (None, None))
        # The timeline from the server's log, in seconds after the drop: each front end's poll saw
        # the change (after its settle look), the executor's load ended, each front end had it (its
        # load request answered, its layers read), each front end swapped.
        until = loaded_wall or dropped_wall
        entry["frontends_saw_change_at_s"] = [round(t - dropped_wall, 3) for m in CHANGED.finditer(log)
                                              if dropped_wall <= (t := log_time(m.group(1))) <= until]  # fmt: skip
        entry["executor_loaded_at_s"] = round(loaded_wall - dropped_wall, 3) if loaded_wall else None
        entry["frontends_had_it_at_s"] = [round(log_time(m.group(1)) - dropped_wall, 3)
                                          for m in SEEN.finditer(log) if m.group(2) == version]  # fmt: skip
        entry["frontends_swapped_at_s"] = [round(log_time(m.group(1)) - dropped_wall, 3)
                                           for m in SWAPPED.finditer(log) if m.group(2) == version]  # fmt: skip
        settle = min(1.0, args.poll_seconds)
        entry["bound_s"] = round(args.poll_seconds + settle + (entry["load_s"] or 0.0), 3)
        # Under load the first answer also waits its turn in the queue: the latency of a request.
        entry["within_bound"] = entry["drop_to_first_answer_s"] <= entry["bound_s"]
    by_version: dict[str, int] = {}
    for _, v in callers.answers:
        by_version[v] = by_version.get(v, 0) + 1
    drop_times = [e["drop_to_first_answer_s"] for e in rounds]
    return {
        "machine": machine_info(),
        "server": "--workers 2 --executor device (2 front ends + 1 device executor), CPU provider, precision auto",
        "callers": args.callers,
        "kinds": list(KINDS),
        "poll_seconds": args.poll_seconds,
        "rounds": rounds,
        "drop_to_first_answer_s": {"min": min(drop_times), "median": statistics.median(drop_times)},
        "answers": len(callers.answers),
        "latency_s": {
            "median": round(statistics.median(callers.latencies), 3),
            "p90": round(float(np.percentile(callers.latencies, 90)), 3),
        },
        "answers_by_version": by_version,
        "failures": len(callers.failures),
        "failure_examples": callers.failures[:5],
        "server_exit_code": exit_code,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-seconds", type=float, default=5.0, help="load before the first drop")
    parser.add_argument("--hold-seconds", type=float, default=5.0, help="load after each new version answers")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="model-swap-") as folder:
        result = asyncio.run(measure(args, Path(folder)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
