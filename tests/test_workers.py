"""The multi-process server (--workers N): front ends sharing the ports, one device executor (or
the models in each worker), metrics and statistics summed over processes, and what happens when
a process is killed with SIGKILL under load: fast retryable failures, a restart, recovery."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until

IMAGES = distinct_images(8, seed=3)
RETRYABLE_GRPC = {"UNAVAILABLE", "CANCELLED"}  # CANCELLED: grpc-core, for calls on a front end's dying socket
RETRYABLE_HTTP = {"503", "refused", "broken"}


def _classify(target: str, image: bytes, timeout: float = 5.0) -> pb.ClassifyResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=image)], top_k=3), timeout=timeout
        )


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = "^" + re.escape(name) + (r"\{" + labels + r"[^}]*\}" if labels else r"(?:\{[^}]*\})?") + r" ([0-9.e+]+)"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


@pytest.fixture(scope="module", params=["device", "worker"])
def two_workers(request):
    s = ServerProcess("--workers", "2", "--executor", request.param, "--drain-seconds", "0")
    s.placement = request.param
    yield s
    assert s.stop() == 0, s.log


def test_both_front_ends_answer_and_agree(two_workers):
    s = two_workers
    assert len([k for k in s.children if k[0] == "front end"]) == 2
    executors = [k for k in s.children if k[0] == "device executor"]
    # --executor device: one executor for the CPU; worker: each front end runs the models itself.
    assert executors == ([("device executor", 0)] if s.placement == "device" else []), s.children
    images = [png_bytes(im) for im in IMAGES]
    single = [_classify(s.grpc_target, im).results[0].predictions[0].label for im in images]
    # New connections each time: the kernel spreads them over both front ends.
    for image, label in zip(images, single):
        r = httpx.post(f"{s.http}/predict?top_k=1", content=image,
                       headers={"Content-Type": "image/png", "Connection": "close"})  # fmt: skip
        assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == label
    r = httpx.get(f"{s.http}/readyz")
    assert r.status_code == 200 and r.json()["models"][0]["name"] == "cifar10"


def test_metrics_and_statistics_cover_every_process(two_workers):
    s = two_workers
    before = httpx.get(f"{s.http}/metrics").text
    stats_before = httpx.get(f"{s.http}/v2/models/cifar10/stats").json()["model_stats"][0]
    image = png_bytes(IMAGES[0])
    n = 24
    for _ in range(n):
        r = httpx.post(f"{s.http}/predict", content=image, headers={"Content-Type": "image/png", "Connection": "close"})
        assert r.status_code == 200
    after = httpx.get(f"{s.http}/metrics").text
    label = 'code="200",method="predict",protocol="http"'
    assert _metric(after, "cnnserve_requests_total", label) - _metric(before, "cnnserve_requests_total", label) == n
    assert _metric(after, "cnnserve_images_total") - _metric(before, "cnnserve_images_total") == n
    assert _metric(after, "cnnserve_workers") == 2
    assert _metric(after, "cnnserve_ready") == 1
    stats = httpx.get(f"{s.http}/v2/models/cifar10/stats").json()["model_stats"][0]
    assert stats["inference_count"] - stats_before["inference_count"] == n
    ok_before, ok_after = stats_before["inference_stats"]["success"], stats["inference_stats"]["success"]
    assert ok_after["count"] - ok_before["count"] == n


def test_queue_full_is_refused_by_every_front_end():
    """The queue bound is the device queue's: front ends learn "full" from shared counters."""
    s = ServerProcess("--workers", "2", "--executor", "device", "--max-batch-size", "1", "--max-queue-size", "8",
                      "--drain-seconds", "0")  # fmt: skip
    try:
        image = png_bytes(IMAGES[0])
        codes: list[str] = []

        def burst():
            with grpc.insecure_channel(s.grpc_target) as channel:
                stub = pb_grpc.ClassifierStub(channel)
                futures = [stub.Classify.future(pb.ClassifyRequest(images=[pb.Image(encoded=image)] * 4), timeout=20)
                           for _ in range(30)]  # fmt: skip
                for f in futures:
                    try:
                        f.result()
                        codes.append("OK")
                    except grpc.RpcError as e:
                        codes.append(e.code().name)
                        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                            assert "queue full" in e.details()

        threads = [threading.Thread(target=burst) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
        assert _classify(s.grpc_target, image).results[0].predictions  # still serving
    finally:
        assert s.stop() == 0, s.log


def _load(s: ServerProcess, stop: threading.Event, grpc_out: list, http_out: list) -> list[threading.Thread]:
    image = png_bytes(IMAGES[1])

    def grpc_loop():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                _classify(s.grpc_target, image, timeout=5)
                grpc_out.append((sent, time.monotonic(), "OK"))
            except grpc.RpcError as e:
                grpc_out.append((sent, time.monotonic(), e.code().name))
                time.sleep(0.02)

    def http_loop():
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r = httpx.post(f"{s.http}/predict", content=image, timeout=5,
                               headers={"Content-Type": "image/png", "Connection": "close"})  # fmt: skip
                http_out.append((sent, time.monotonic(), str(r.status_code)))
            except httpx.ConnectError:
                http_out.append((sent, time.monotonic(), "refused"))
            except httpx.TransportError:
                http_out.append((sent, time.monotonic(), "broken"))
            if http_out[-1][2] != "200":
                time.sleep(0.02)

    threads = [threading.Thread(target=f) for f in (grpc_loop, grpc_loop, http_loop, http_loop)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("victim", ["device executor", "front end"])
def test_sigkill_under_load_fails_fast_restarts_and_recovers(victim):
    s = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0")
    stop = threading.Event()
    grpc_out: list = []
    http_out: list = []
    threads = _load(s, stop, grpc_out, http_out)
    try:
        assert wait_until(lambda: len(grpc_out) > 20 and len(http_out) > 10, timeout=30)
        pid = s.children[(victim, 0)]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: s.children[(victim, 0)] != pid, timeout=10), s.log
        assert "died: SIGKILL (exit status -9); restarting it" in s.log
        # The load goes on until the replacement serves, and a little after (it joins the port then).
        assert wait_until(lambda: f"{victim} 0 (pid {s.children[(victim, 0)]}) is ready" in s.log, timeout=30), s.log
        time.sleep(1)
        # Recovery: both protocols succeed again within seconds of the kill.
        assert wait_until(lambda: any(t0 > killed and o == "OK" for t0, _, o in grpc_out[-50:]), timeout=20), s.log
        assert wait_until(lambda: any(t0 > killed and o == "200" for t0, _, o in http_out[-50:]), timeout=20), s.log
        assert wait_until(lambda: httpx.get(f"{s.http}/readyz").status_code == 200, timeout=20)
        if victim == "front end":  # its shared-memory slabs went with it
            assert not list(Path("/dev/shm").glob(f"cnnserve-*/fe*-{pid}-*.slab"))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        code = s.stop()
    assert code == 0, s.log
    # Nothing hung: every call ended well inside its 5 s timeout, and every failure is retryable.
    assert all(t1 - t0 < 4.5 for t0, t1, _ in grpc_out + http_out)
    assert {o for *_, o in grpc_out} <= {"OK"} | RETRYABLE_GRPC, {o for *_, o in grpc_out}
    assert {o for *_, o in http_out} <= {"200"} | RETRYABLE_HTTP, {o for *_, o in http_out}
    if victim == "front end":
        # The other front end served throughout, and its replacement joined the port only once
        # ready: no request was answered 503 "loading" (only the killed one's were cut).
        assert {o for *_, o in http_out} <= {"200", "broken"}, {o for *_, o in http_out}
    if victim == "device executor":
        # Its in-flight requests failed at once as UNAVAILABLE / 503 rather than waiting.
        failed = [(t1 - t0) for t0, t1, o in grpc_out + http_out if o in ("UNAVAILABLE", "503")]
        assert failed and max(failed) < 3.0


def test_what_the_supervisor_shares_out_and_says_once():
    """CUDA that cannot run is said once (by the supervisor, not by every child); the server-wide
    caps are shared out among the front ends, and ORT's threads among the processes."""
    from service.inference.devices import cuda_available

    cuda_ok, reason = cuda_available()
    caps = ["--max-connections", "101", "--max-buffered-bytes", str(8 << 20)]
    s = ServerProcess("--workers", "2", "--executor", "worker", "--providers", "cuda,cpu", "--intra-op-threads", "0",
                      *caps, "--drain-seconds", "0")  # fmt: skip
    try:
        if not cuda_ok:
            assert s.log.count(f"{reason}: running on the CPU") == 1, s.log
        cores = len(os.sched_getaffinity(0))
        expected = f"each process: {max(1, cores // 2)} ONNX Runtime intra-op thread(s); each front end: up to 51 "
        assert expected in s.log and f"{4 << 20} buffered request bytes" in s.log, s.log
        assert "1 explanation(s) at once and 4 waiting" in s.log, s.log  # 2 and 8 for the server
        assert _classify(s.grpc_target, png_bytes(IMAGES[0])).results[0].predictions
    finally:
        assert s.stop() == 0, s.log
