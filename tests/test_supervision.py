"""Supervision of a multi-process server under injected faults: a process stopped with SIGSTOP
(hung) is aborted and replaced within --hang-timeout-seconds, no request outlives its deadline,
readiness says so, the shared queue counter comes back to 0; a second server on taken ports
refuses; run folders of dead servers are swept; metrics files stay flat across restarts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench import serverproc
from service.metrics import ModelStats
from service.workers import shared_memory
from tests.conftest import MODEL_REPOSITORY, ServerProcess, distinct_images, png_bytes, wait_until

IMAGE = png_bytes(distinct_images(1, seed=5)[0])
HANG_TIMEOUT_S = 2.0
DEADLINE_MS = 1000
FAST = ["--workers", "2", "--executor", "device", "--drain-seconds", "0",
        "--hang-timeout-seconds", str(HANG_TIMEOUT_S)]  # fmt: skip


def _table(s: ServerProcess) -> shared_memory.ControlTable:
    shape = shared_memory.TableShape(str(s.run_folder() / "control"), 1, 2, 1, ModelStats.width(64))
    return shared_memory.ControlTable(shape)


def _ready(s: ServerProcess, timeout: float = 2) -> bool:
    try:
        return httpx.get(f"{s.http}/readyz", timeout=timeout).status_code == 200
    except httpx.TransportError:  # every front end restarting at once: nothing listens
        return False


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
        if victim == "front end":  # probes on new connections, as a kubelet's: some reach the other one
            served = wait_until(lambda: _ready(s, timeout=0.3), timeout=HANG_TIMEOUT_S, interval=0)
        # Aborted past the timeout (+1 s between SIGABRT and SIGKILL), then replaced.
        assert wait_until(lambda: s.children[(victim, 0)] != pid, timeout=HANG_TIMEOUT_S + 10), s.log
        replaced = time.monotonic() - stopped
        assert re.search(rf"{victim} 0 \(pid {pid}\) is hung: its (event loop|I/O thread|compute thread)", s.log)
        assert wait_until(lambda: _ready(s), timeout=20), s.log
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
            # Readiness turned false between the hang and the successor being ready. (Not only
            # before the replacement: SIGABRT + SIGCONT ends a stopped process at once, so judged
            # hung and replaced can be milliseconds apart; the successor's start is the long part.)
            assert 503 in [code for t, code in ready if stopped < t < resumed], ready
        else:
            assert served or 200 in during  # the other front end served on, and readiness said so
            # ... also once its gRPC self-check's last answer (kept 1 s) is stale: it checks its own
            # gRPC server, not whichever front end the shared port hands it (the stopped one made
            # it answer 503 for the whole hang).
            assert 503 not in [code for t, code in ready if stopped + 1.1 < t < stopped + replaced], ready
        print(f"\n{victim}: replaced after {replaced:.1f}s; longest call {longest:.2f}s; outcomes {sorted(outcomes)}")
    finally:
        assert s.stop() == 0, s.log


def test_second_server_on_taken_ports_refuses_and_dead_run_folders_are_swept(tmp_path):
    # A run folder whose supervisor is gone (a pid that just exited), as a SIGKILLed server leaves.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = Path("/dev/shm") / f"cnnserve-test-{os.getpid()}"
    leftover.mkdir()
    (leftover / "owner").write_text(f"{dead.pid} 12345")
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
        metrics_dir = s.run_folder() / "metrics"
        for _ in range(3):
            assert httpx.post(f"{s.http}/predict", content=IMAGE, headers={"Content-Type": "image/png"}).is_success
        before = len(list(metrics_dir.iterdir()))
        total = _requests_total(s)
        for _ in range(3):
            pid = s.children[("front end", 1)]
            os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda dead=pid: s.children[("front end", 1)] != dead, timeout=20), s.log
            assert wait_until(lambda: _ready(s), timeout=20)
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


def test_a_process_failing_at_boot_again_and_again_stops_the_server(tmp_path):
    """A row once ready whose successors cannot boot (here: the model file broke meanwhile, as a
    vanished GPU would) stops the server with exit 1 and the cause, so an orchestrator restarts it."""
    shutil.copytree(MODEL_REPOSITORY, tmp_path / "models")
    s = ServerProcess(*FAST, "--boot-failure-limit", "2", "--model-repository", str(tmp_path / "models"))
    try:
        (tmp_path / "models" / "cifar10" / "1" / "model.onnx").write_bytes(b"not a model")
        os.kill(s.children[("device executor", 0)], signal.SIGKILL)
        assert s.proc.wait(60) == 1, s.log
    finally:
        s.stop()
    assert "device executor 0 failed at boot 2 times in a row (last exit status 1)" in s.log, s.log
    assert re.search(r"died: exit status 1; restarting it in [0-9.]+s", s.log), s.log  # backed off first


def _unshare_works() -> bool:
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


SMALL_SHM = pytest.mark.skipif(not _unshare_works(), reason="needs a private mount namespace (unshare -m: root "
                               "or user namespaces) to give the server a small /dev/shm of its own")  # fmt: skip


def _in_small_shm(size: str) -> tuple[str, ...]:
    return ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh")


@SMALL_SHM
def test_too_small_dev_shm_is_refused_at_start_in_words():
    s = serverproc.ServerProcess("--workers", "2", "--executor", "device", "--intra-op-threads", "1",
                                 prefix=_in_small_shm("4m"), wait="")  # fmt: skip
    assert s.proc.wait(60) == 1, s.log
    assert re.search(r"not enough shared memory in /dev/shm: [34] MiB free, this server needs about \d+ MiB", s.log)
    assert "Bus error" not in s.log and "Traceback" not in s.log, s.log


@SMALL_SHM
def test_dev_shm_full_at_run_time_is_said_in_words_and_the_server_recovers():
    small = ("--max-queue-size", "64", "--max-batch-size", "8")
    s = serverproc.ServerProcess(*FAST, "--intra-op-threads", "1", *small, prefix=_in_small_shm("8m"))
    try:
        shm = Path(f"/proc/{s.proc.pid}/root/dev/shm")  # the server's private /dev/shm, seen from here
        free = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
        (shm / "filler").write_bytes(b"\1" * (free - 64 * 1024))
        # The executor restarts; each front end makes new slabs for it, finds no room and says so.
        os.kill(s.children[("device executor", 0)], signal.SIGKILL)
        assert wait_until(lambda: "died: exit status 75: no room in shared memory" in s.log, timeout=30), s.log
        said = (
            r"front end \d: no room in /dev/shm/cnnserve-\w+ for fe\d-ex0-\d+-2\.slab: "
            r"it needs [0-9.]+ MiB, 0\.\d MiB are free; give the container a larger /dev/shm"
        )
        assert re.search(said, s.log), s.log
        # Their old slabs went with them: the restarted front ends fit, and the server serves again.
        # Ready means every front end that takes connections serves: each new connection is answered.
        assert wait_until(lambda: _ready(s), timeout=30), s.log
        for _ in range(8):
            r = httpx.post(f"{s.http}/predict", content=IMAGE, headers={"Content-Type": "image/png"})
            assert r.status_code == 200, r.text
    finally:
        assert s.stop() == 0, s.log


def test_v2_layer_activations_go_through_the_explanations_admission():
    """Layer outputs cost CPU like an explanation: with the one explanation slot taken and no
    queue, a v2 request asking for fc3 is refused at once (429) rather than piling onto the CPU."""
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0",
                      "--explain-concurrency", "1", "--explain-queue-size", "0")  # fmt: skip
    x = (distinct_images(1, seed=2).transpose(0, 3, 1, 2) / 255.0).astype("float32")
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": x.ravel().tolist()}],
            "outputs": [{"name": "fc3"}]}  # fmt: skip
    stop = threading.Event()

    def explain_loop():
        files = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(distinct_images(4))]
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(f"{s.http}/explain?method=rise", files=files)

    threads = [threading.Thread(target=explain_loop) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        codes: list[int] = []
        until = time.monotonic() + 20
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < until and 429 not in codes:
                r = client.post(f"{s.http}/v2/models/cifar10/infer", json=body)
                codes.append(r.status_code)
                if r.status_code == 429:
                    assert "explanations busy" in r.json()["error"]
        assert 429 in codes and set(codes) <= {200, 429}, codes
        stop.set()
        for t in threads:
            t.join(60)
        r = httpx.post(f"{s.http}/v2/models/cifar10/infer", json=body)  # the slot is free again
        assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 512], r.text
    finally:
        stop.set()
        assert s.stop() == 0, s.log


def test_unexpected_failures_answer_500_and_internal_and_are_counted(tmp_path):
    """A fault no domain error names (here a layers.onnx that takes one image at a time, so ONNX
    Runtime raises on two) answers HTTP 500 / gRPC INTERNAL, counted in cnnserve_requests_total so
    the error-ratio alert sees it; the server serves on."""
    import numpy as np
    import onnx
    import tritonclient.grpc as tgrpc
    from tritonclient.utils import InferenceServerException

    shutil.copytree(MODEL_REPOSITORY, tmp_path / "models")
    layers = tmp_path / "models" / "cifar10" / "1" / "layers.onnx"
    graph = onnx.load(str(layers))
    graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(graph, str(layers))
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0",
                      "--model-repository", str(tmp_path / "models"))  # fmt: skip
    try:
        files = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(distinct_images(2))]
        r = httpx.post(f"{s.http}/explain", files=files, timeout=60)
        assert r.status_code == 500 and r.json() == {"error": "internal error: InvalidArgument"}, r.text
        x = (distinct_images(2, seed=3).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)
        client = tgrpc.InferenceServerClient(s.grpc_target)
        given = tgrpc.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as failed:
            client.infer("cifar10", [given], outputs=[tgrpc.InferRequestedOutput("fc3")])
        assert failed.value.status() == "StatusCode.INTERNAL", failed.value
        r = httpx.post(f"{s.http}/predict", content=IMAGE, headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text  # served on
        text = httpx.get(f"{s.http}/metrics").text
        assert re.search(r'^cnnserve_requests_total\{code="500",method="explain",protocol="http"\} 1\.0$', text, re.M)
        assert re.search(r'^cnnserve_requests_total\{code="INTERNAL",method="ModelInfer",protocol="grpc"\} 1\.0$',
                         text, re.M), text  # fmt: skip
        assert "explain failed unexpectedly" in s.log and "ModelInfer failed unexpectedly" in s.log
    finally:
        assert s.stop() == 0, s.log


class _PredictLoop:
    """One client posting the same ``images``-image /predict to ``s`` until ended (each must be 200)."""

    def __init__(self, s: ServerProcess, images: int) -> None:
        self.stop = threading.Event()
        files = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(distinct_images(images))]

        def load() -> None:
            with httpx.Client(timeout=60) as client:
                while not self.stop.is_set():
                    assert client.post(f"{s.http}/predict", files=files).status_code == 200

        self.thread = threading.Thread(target=load)

    def start(self) -> None:
        self.thread.start()

    def end(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:
            self.thread.join(60)


def test_worker_front_ends_report_their_batches_in_flight_to_the_supervisor():
    """--executor worker: each front end's batches in flight are in its row of the shared table
    (beat when handed over, the batch's images in busy), which the supervisor judges like an
    executor's compute thread; cleared when the batch comes back."""
    s = ServerProcess("--workers", "2", "--executor", "worker", "--drain-seconds", "0", "--precision", "fp32",
                      "--max-batch-size", "256")  # fmt: skip
    caller = _PredictLoop(s, 128)
    try:
        shape = shared_memory.TableShape(str(s.run_folder() / "control"), 0, 2, 1, ModelStats.width(256))
        table = shared_memory.ControlTable(shape)
        slot = table.compute_slot(0)
        caller.start()
        seen: list[tuple[float, int]] = []

        def in_flight() -> bool:
            busy = table.busy[:, slot].copy()
            beats = table.beat[:, slot].copy()
            seen.extend((b, int(n)) for b, n in zip(beats, busy) if n)
            return bool(seen)

        assert wait_until(in_flight, timeout=30, interval=0.001), s.log
        # Read without a lock (as the supervisor does): a beat may be caught just set or just cleared.
        assert wait_until(lambda: in_flight() and any(beat > 0 for beat, _ in seen), timeout=30, interval=0.001)
        assert {images for _, images in seen} == {128}, seen
        caller.end()
        assert wait_until(lambda: not table.busy[:, slot].any() and not table.beat[:, slot].any(), timeout=10)
    finally:
        caller.end()
        assert s.stop() == 0, s.log


def test_one_process_healthz_fails_while_a_batch_is_out_past_the_hang_timeout():
    """One process has no supervisor: /healthz answers 503 (for the kubelet's liveness probe) while
    a batch has been out longer than --hang-timeout-seconds, here set below what a 256-image batch
    takes so that a legitimate batch stands in for a stuck one; 200 again once it is back."""
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0", "--precision", "fp32",
                      "--max-batch-size", "256", "--hang-timeout-seconds", "0.01")  # fmt: skip
    caller = _PredictLoop(s, 256)
    try:
        assert httpx.get(f"{s.http}/healthz").json() == {"status": "live"}
        caller.start()
        answers: list[httpx.Response] = []

        def hung() -> bool:
            answers.append(httpx.get(f"{s.http}/healthz", timeout=10))
            return answers[-1].status_code == 503

        assert wait_until(hung, timeout=60, interval=0.005), s.log
        why = answers[-1].json()
        assert why["status"] == "hung" and re.match(
            r"the batch thread for cifar10/1 has not come back for [0-9.]+s with a batch of 256 image\(s\) "
            r"\(--hang-timeout-seconds 0\.01\)$", why["reason"]), why  # fmt: skip
        assert wait_until(lambda: "not live: the batch thread for cifar10/1" in s.log, timeout=10), s.log
        caller.end()
        assert httpx.get(f"{s.http}/healthz").json() == {"status": "live"}  # the batch came back
    finally:
        caller.end()
        assert s.stop() == 0, s.log
