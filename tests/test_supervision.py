"""Supervision of a multi-process server under injected faults: a process stopped with SIGSTOP
(hung) is aborted and replaced within --hang-timeout-seconds, no request outlives its deadline,
readiness says so, the shared queue counter comes back to 0; a second server on taken ports
refuses; run folders of dead servers are swept; metrics files stay flat across restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.metrics import ModelStats
from service.workers import shared_memory as ipc
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until

IMAGE = png_bytes(distinct_images(1, seed=5)[0])
HANG_TIMEOUT_S = 2.0
DEADLINE_MS = 1000
FAST = ["--workers", "2", "--executor", "device", "--drain-seconds", "0",
        "--hang-timeout-seconds", str(HANG_TIMEOUT_S)]  # fmt: skip


def _run_dir(s: ServerProcess) -> Path:
    for path in Path("/dev/shm").glob("cnnserve-*"):
        try:
            if int((path / "owner").read_text()) == s.proc.pid:
                return path
        except (OSError, ValueError):
            continue
    raise AssertionError("the server's run folder was not found")


def _table(s: ServerProcess) -> ipc.ControlTable:
    shape = ipc.TableShape(str(_run_dir(s) / "control"), 1, 2, 1, ModelStats.width(64))
    return ipc.ControlTable(shape)


def _light_load(s: ServerProcess, stop: threading.Event, out: list) -> list[threading.Thread]:
    """Two HTTP callers, each with a 1 s deadline (X-Request-Timeout-Ms) and a generous client
    timeout, so what is measured is when the server answers."""

    def loop():
        with httpx.Client(timeout=15) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    headers = {"Content-Type": "image/png", "X-Request-Timeout-Ms": str(DEADLINE_MS)}
                    r = client.post(f"{s.http}/predict", content=IMAGE, headers=headers)
                    outcome = str(r.status_code)
                except httpx.TransportError as e:
                    outcome = type(e).__name__
                out.append((sent, time.monotonic(), outcome))
                time.sleep(0.05)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    return threads


def _watch_readyz(s: ServerProcess, stop: threading.Event, out: list) -> threading.Thread:
    def loop():
        while not stop.is_set():
            try:
                # A new connection each time: the kernel spreads them over the front ends, as a probe's.
                out.append((time.monotonic(), httpx.get(f"{s.http}/readyz", timeout=0.5).status_code))
            except httpx.TransportError:
                out.append((time.monotonic(), 0))  # landed on the stopped front end
            time.sleep(0.05)

    t = threading.Thread(target=loop)
    t.start()
    return t


@pytest.mark.parametrize("victim", ["device executor", "front end"])
def test_sigstop_hung_process_is_replaced_and_nothing_waits_or_leaks(victim):
    s = ServerProcess(*FAST)
    stop = threading.Event()
    calls: list = []
    ready: list = []
    threads = [*_light_load(s, stop, calls), _watch_readyz(s, stop, ready)]
    try:
        table = _table(s)
        assert wait_until(lambda: sum(o == "200" for *_, o in calls) > 10, timeout=30), s.log
        pid = s.children[(victim, 0)]
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        # Aborted past the timeout (+1 s between SIGABRT and SIGKILL), then replaced.
        assert wait_until(lambda: s.children[(victim, 0)] != pid, timeout=HANG_TIMEOUT_S + 10), s.log
        replaced = time.monotonic() - stopped
        assert re.search(rf"{victim} 0 \(pid {pid}\) is hung: its (event loop|I/O thread|compute thread)", s.log)
        assert wait_until(lambda: httpx.get(f"{s.http}/readyz").status_code == 200, timeout=20), s.log
        resumed = time.monotonic()
        assert wait_until(lambda: any(t0 > resumed and o == "200" for t0, _, o in calls), timeout=20), s.log
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        # Nothing leaks: with no request in flight, the shared queue counter is back to 0.
        assert wait_until(lambda: table.queue_depth(0) == 0, timeout=5), (table.submitted, table.taken)
        outcomes = {o for *_, o in calls}
        longest = max(t1 - t0 for t0, t1, _ in calls)
        if victim == "device executor":  # no request waited past its deadline + 1 s
            assert longest < DEADLINE_MS / 1000 + 1.0, s.log
        else:  # a stopped front end cannot answer: its connections end when it is aborted
            assert longest < HANG_TIMEOUT_S + 1.0 + 1.0, s.log
        assert outcomes <= {"200", "503", "504", "RemoteProtocolError", "ReadError", "ConnectError"}, outcomes
        during = [code for t, code in ready if stopped < t < stopped + replaced]
        if victim == "device executor":
            assert "504" in outcomes  # the deadline's timer answered while the executor was stopped
            assert 503 in during  # readiness turned false once it was judged hung, until replaced
        else:
            assert 200 in during  # the other front end served on, and readiness said so
        print(f"\n{victim}: replaced after {replaced:.1f}s; longest call {longest:.2f}s; outcomes {sorted(outcomes)}")
    finally:
        assert s.stop() == 0, s.log


def test_second_server_on_taken_ports_refuses_and_dead_run_folders_are_swept(tmp_path):
    # A run folder whose supervisor is gone (a pid that just exited), as a SIGKILLed server leaves.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = Path("/dev/shm") / f"cnnserve-test-{os.getpid()}"
    leftover.mkdir()
    (leftover / "owner").write_text(str(dead.pid))
    (leftover / "fe0-ex0-1-1.slab").write_bytes(b"\0" * 4096)
    s = ServerProcess("--workers", "2", "--executor", "worker", "--drain-seconds", "0")
    try:
        assert not leftover.exists() and "removed 1 run folder(s) of servers that died" in s.log, s.log
        ports = ["--http-port", str(s.http_port), "--grpc-port", str(s.grpc_port)]
        for workers in ("2", "1"):
            second = subprocess.run(
                [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--providers", "cpu",
                 "--workers", workers, "--executor", "worker", *ports],
                capture_output=True, text=True, timeout=60)  # fmt: skip
            assert second.returncode == 1, second.stderr
            assert re.search(rf"port ({s.http_port}|{s.grpc_port}) is already in use", second.stderr), second.stderr
            assert "listening" not in second.stderr
        assert httpx.get(f"{s.http}/readyz").status_code == 200  # the first one serves on
    finally:
        assert s.stop() == 0, s.log
        subprocess.run(["rm", "-rf", str(leftover)], check=False)


def test_metrics_files_stay_flat_and_totals_survive_restarts():
    s = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0")
    try:
        metrics_dir = _run_dir(s) / "metrics"
        for _ in range(3):
            assert httpx.post(f"{s.http}/predict", content=IMAGE, headers={"Content-Type": "image/png"}).is_success
        before = len(list(metrics_dir.iterdir()))
        total = _requests_total(s)
        for _ in range(3):
            pid = s.children[("front end", 1)]
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda dead=pid: s.children[("front end", 1)] != dead, timeout=20), s.log
            assert wait_until(lambda: httpx.get(f"{s.http}/readyz").status_code == 200, timeout=20)
            assert not list(metrics_dir.glob(f"*_{pid}.db"))
        assert wait_until(lambda: len(list(metrics_dir.iterdir())) <= before + 3, timeout=20)
        # The three archive files are the only addition, however many processes died.
        assert len(list(metrics_dir.iterdir())) <= before + 3, sorted(p.name for p in metrics_dir.iterdir())
        assert _requests_total(s) >= total  # counters of the dead are kept
    finally:
        assert s.stop() == 0, s.log


def _requests_total(s: ServerProcess) -> float:
    text = httpx.get(f"{s.http}/metrics").text
    pattern = r'^cnnserve_requests_total\{[^}]*code="200"[^}]*\} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text, re.M))
