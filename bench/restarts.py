"""Many front-end restarts in a row, and a killed supervisor (issue 18: "100 restarts in a row:
/metrics time and /dev/shm use flat; a killed supervisor's folder swept by the next start").

Starts ``--workers 2 --executor device``, then ``--restarts`` times: SIGKILL one front end
(alternately 0 and 1), wait for its successor to be READY in the shared table, send a few
/predict requests. Every ``--every`` restarts (and before the first) it records /metrics' response
time (min of 5 GETs), its size, the run folder's files and the /dev/shm room they take. The
supervisor's restart backoff applies (a front end killed within 30 s of its start waits up to
10 s), so 100 restarts take ~20 minutes.

Then a second server's supervisor is SIGKILLed (its children stop with it, PR_SET_PDEATHSIG) and
a third server is started, which removes the folder the second one left (on a machine where
other servers start meanwhile, one of them may sweep it first: ``log`` is then empty).

    .venv/bin/python bench/restarts.py                    # 100 restarts, ~20 min
    .venv/bin/python bench/restarts.py --restarts 10 --every 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import ServerProcess  # noqa: E402
from service.metrics import ModelStats  # noqa: E402
from service.workers import shared_memory  # noqa: E402

MAX_BATCH = 64  # the server's default --max-batch-size: the table's statistics width depends on it


def folder_use(path: Path) -> dict:
    """Files and the room they take in /dev/shm (allocated blocks, not apparent sizes)."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return {
        "files": len(files),
        "metrics_files": len(list((path / "metrics").iterdir())),
        "kib": sum(p.stat().st_blocks * 512 for p in files) // 1024,
    }


def sample(s: ServerProcess, folder: Path, restarts: int) -> dict:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        body = httpx.get(f"{s.http}/metrics", timeout=30).content
        times.append((time.perf_counter() - started) * 1000)
    return {"restarts": restarts, "metrics_ms": round(min(times), 2), "metrics_bytes": len(body),
            "metrics_lines": body.count(b"\n"), **folder_use(folder)}  # fmt: skip


def predict_a_few(s: ServerProcess, png: bytes) -> None:
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            client.post(f"{s.http}/predict", content=png, headers={"Content-Type": "image/png"}).raise_for_status()


def restarts(args: argparse.Namespace, png: bytes) -> list[dict]:
    s = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0")
    try:
        folder = s.run_folder()
        shape = shared_memory.TableShape(str(folder / "control"), 1, 2, 1, ModelStats.width(MAX_BATCH))
        table = shared_memory.ControlTable(shape)
        predict_a_few(s, png)
        samples = [sample(s, folder, 0)]
        print(json.dumps(samples[-1]), flush=True)
        started = time.monotonic()
        for i in range(1, args.restarts + 1):
            index = i % 2
            row = shape.frontend_row(index)
            old = s.children[("front end", index)]
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while not (s.children[("front end", index)] != old and table.state[row] == shared_memory.READY
                       and table.pid[row] != old):  # fmt: skip
                if time.monotonic() > deadline or s.proc.poll() is not None:
                    raise RuntimeError(f"front end {index} was not replaced after restart {i}:\n{s.log[-3000:]}")
                time.sleep(0.02)
            predict_a_few(s, png)
            if i % args.every == 0:
                samples.append({**sample(s, folder, i), "elapsed_s": round(time.monotonic() - started, 1)})
                print(json.dumps(samples[-1]), flush=True)
        return samples
    finally:
        s.stop()


def killed_supervisor() -> dict:
    second = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0")
    folder = second.run_folder()
    left = folder_use(folder)
    children = list(second.children.values())
    second.proc.kill()
    second.proc.wait()
    still_there = folder.exists()
    deadline = time.monotonic() + 60  # its children stop with it (PR_SET_PDEATHSIG); then it is left behind
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    before_next_start = folder.exists()
    third = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0")
    try:
        swept = not folder.exists()
        said = [line.strip() for line in third.lines if "run folder(s) of servers that died" in line]
    finally:
        third.stop()
    return {"killed_supervisor_folder": folder.name, "left_kib": left["kib"], "left_files": left["files"],
            "left_behind": still_there, "still_there_at_next_start": before_next_start,
            "swept_by_next_start": swept, "log": said}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restarts", type=int, default=100)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    samples = restarts(args, buf.getvalue())
    first, last = samples[0], samples[-1]
    print(json.dumps({"first": first, "last": last}))
    print(json.dumps(killed_supervisor()))


if __name__ == "__main__":
    main()
