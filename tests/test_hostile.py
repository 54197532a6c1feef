"""Hostile input and slow clients (issue 10): each test sends what an attacker would, bounded in
time and size, against a real server, checks the refusal, and then that the server still answers
a normal request correctly."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import socket
import time

import grpc
import httpx
import numpy as np
import orjson
import pytest
from PIL import Image, ImageOps, PngImagePlugin
from tritonclient.grpc import service_pb2 as v2pb
from tritonclient.grpc import service_pb2_grpc as v2pb_grpc

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until
from tests.test_server import Reference, assert_matches_reference, metric_samples, sample

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def reference():
    return Reference()


def _hostile_server(*extra: str) -> ServerProcess:
    """Short timeouts and small caps, so that every limit is reached in well under a second."""
    return ServerProcess(
        *extra,
        "--drain-seconds",
        "0",
        "--header-timeout-seconds",
        "1",
        "--body-timeout-seconds",
        "1.5",
        "--max-buffered-bytes",
        str(4 * MIB),
        "--max-image-pixels",
        str(1024 * 1024),
        "--max-request-pixels",
        str(8 * 1024 * 1024),
        "--max-connections",
        "16",
        "--decode-threads",
        "1",
        "--log-level",
        "DEBUG",
    )


@pytest.fixture(scope="module")
def hostile():
    s = _hostile_server()
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture(scope="module")
def hostile_one_process():
    """The same, as one process whatever CNNSERVE_TEST_WORKERS says: the per-process caps
    (connections, buffered bytes) are counted exactly only when one process takes every
    connection (with several front ends each gets its share of the cap: README). It also refuses
    non-finite tensors (the opt-in), which needs no server of its own."""
    s = _hostile_server("--workers", "1", "--executor", "worker", "--refuse-non-finite")
    yield s
    assert s.stop() == 0, s.log


def serves_normally(server: ServerProcess, reference: Reference, seed: int = 0) -> None:
    """A normal /predict request right after an attack: 200 and the reference's answer."""
    pixels = distinct_images(1, seed=seed)
    r = httpx.post(f"{server.http}/predict", content=png_bytes(pixels[0]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    assert_matches_reference(r.json()["results"][0]["predictions"], reference.probabilities(pixels)[0], 5)
    assert server.proc.poll() is None


def raw_exchange(
    port: int, data: bytes, timeout: float = 10, chunk: int = 64 * 1024, source: str | None = None
) -> bytes:
    """Send ``data`` on a fresh connection (as far as the server lets us, from the loopback address
    ``source`` if given) and read to the close."""
    sock = socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
    )
    try:
        for i in range(0, len(data), chunk):
            try:
                sock.sendall(data[i : i + chunk])
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_to_close(sock)
    finally:
        sock.close()


def read_to_close(sock: socket.socket) -> bytes:
    out = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                return out
            out += part
    except ConnectionResetError:
        return out


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and Content-Length bytes of body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(l.split(b":")[1]) for l in head.lower().split(b"\r\n") if l.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def json_body(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return orjson.loads(body)


def log_since(server: ServerProcess, mark: int) -> str:
    return "".join(server.lines[mark:])


# ---- 1. numbers are ASCII digits or a 400/422 ----------------------------------------------------
def test_non_ascii_and_odd_numbers_are_refused_not_500(hostile, reference):
    mark = len(hostile.lines)
    before = metric_samples(hostile.http)
    body = b'{"inputs":[]}'
    request = (
        b"POST /v2/models/cifar10/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: \xb2\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    sock = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
    sock.sendall(request)
    head = read_response(sock)
    sock.close()
    assert status_of(head) == 400 and "Inference-Header-Content-Length" in json_body(head)["error"]
    after = metric_samples(hostile.http)
    moved = sample(after, "cnnserve_requests_total", protocol="http", method="v2_infer", code="400") - sample(
        before, "cnnserve_requests_total", protocol="http", method="v2_infer", code="400"
    )
    assert moved == 1

    image = png_bytes(distinct_images(1)[0])
    for top_k in ("\u0665", "1_0", " 3 ", "+3", "3.0", "9" * 5000):
        r = httpx.post(
            f"{hostile.http}/predict", params={"top_k": top_k}, content=image, headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 422 and "top_k" in r.json()["error"], (top_k, r.text)
    for timeout in (b"\xb2", b"1_0", b"nan", b"inf", b"1e3", b"5 0", b"-5", b"0"):
        r = httpx.post(
            f"{hostile.http}/predict",
            content=image,
            headers=[(b"Content-Type", b"image/png"), (b"X-Request-Timeout-Ms", timeout)],
        )
        assert r.status_code == 422 and "x-request-timeout-ms" in r.json()["error"], (timeout, r.text)
    r = httpx.post(
        f"{hostile.http}/predict",
        content=image,
        headers={"Content-Type": "image/png", "X-Request-Timeout-Ms": "2500.5"},
    )
    assert r.status_code == 200
    assert "Traceback" not in log_since(hostile, mark) and "internal error" not in log_since(hostile, mark)
    serves_normally(hostile, reference)


# ---- 2. header size and count ----------------------------------------------------------------------
def test_a_huge_header_or_too_many_headers_get_431_as_the_bytes_arrive(hostile, reference):
    # 8 MiB of one header value: refused after the first 32 KiB (+ one read), not parsed to the end.
    sent = time.monotonic()
    response = raw_exchange(hostile.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 * MIB))
    assert status_of(response) == 431 and "exceed" in json_body(response)["error"]
    # Meanwhile (and right after) other clients are answered.
    assert httpx.get(f"{hostile.http}/healthz").status_code == 200
    # A long URL counts too.
    response = raw_exchange(hostile.http_port, b"GET /healthz?" + b"q" * (100 * 1024) + b" HTTP/1.1\r\n\r\n")
    assert status_of(response) == 431
    # 10,000 tiny headers (60 KB).
    response = raw_exchange(hostile.http_port, b"GET /healthz HTTP/1.1\r\n" + b"a: b\r\n" * 10_000 + b"\r\n")
    assert status_of(response) == 431 and "headers" in json_body(response)["error"]
    # 99 headers are fine.
    r = httpx.get(f"{hostile.http}/healthz", headers={f"x-h{i}": "v" for i in range(90)})
    assert r.status_code == 200
    assert time.monotonic() - sent < 60  # bounded attack (not a speed assertion: the test's own budget)
    serves_normally(hostile, reference)


# ---- 3. a pixel budget per request, decoding that stops -------------------------------------------
def _lossless_webp(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_many_small_files_that_inflate_hit_the_request_pixel_budget(hostile, reference):
    bomb = _lossless_webp(1024)  # 1 Mi pixels each: at the per-image limit, tiny on the wire
    assert len(bomb) < 2000
    doc = {"images": [base64.b64encode(bomb).decode()] * 32}
    before = metric_samples(hostile.http)
    r = httpx.post(f"{hostile.http}/predict", json=doc, timeout=30)
    assert r.status_code == 413 and "max_request_pixels" in r.json()["error"], r.text
    # Eight of them fit the 8 Mi-pixel budget and are classified.
    r = httpx.post(f"{hostile.http}/predict", json={"images": doc["images"][:8]}, timeout=30)
    assert r.status_code == 200 and len(r.json()["results"]) == 8
    # gRPC draws on the same budget.
    with grpc.insecure_channel(hostile.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[pb.Image(encoded=bomb)] * 9), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_pixels" in info.value.details()
    after = metric_samples(hostile.http)
    assert (
        sample(after, "cnnserve_images_total", model="cifar10")
        - sample(before, "cnnserve_images_total", model="cifar10")
        == 8
    )
    serves_normally(hostile, reference)


def test_the_deadline_is_checked_between_images(hostile, reference):
    bomb = base64.b64encode(_lossless_webp(1024)).decode()
    before = metric_samples(hostile.http)
    r = httpx.post(
        f"{hostile.http}/predict",
        json={"images": [bomb, bomb]},
        headers={"X-Request-Timeout-Ms": "1"},
        timeout=30,
    )
    assert r.status_code == 504 and "decoding" in r.json()["error"], r.text
    after = metric_samples(hostile.http)
    assert (
        sample(after, "cnnserve_rejected_total", reason="deadline")
        - sample(before, "cnnserve_rejected_total", reason="deadline")
        == 1
    )
    assert sample(after, "cnnserve_images_total", model="cifar10") == sample(
        before, "cnnserve_images_total", model="cifar10"
    )
    serves_normally(hostile, reference)


def test_decoding_for_a_caller_that_left_stops(hostile, reference):
    # Twelve requests of eight 1024x1024 lossless WebPs (~1 KB, ~17 ms of decoding each: ~1.6 s
    # in all) for the one decode thread, whose callers hang up once the first has started.
    doc = orjson.dumps({"images": [base64.b64encode(_lossless_webp(1024)).decode()] * 8})
    request = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(doc)
    )
    mark = len(hostile.lines)
    before = metric_samples(hostile.http)
    sockets = []
    for _ in range(12):
        sock = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
        sock.sendall(request + doc)
        sockets.append(sock)
    assert wait_for_log(hostile, mark, "decoding 8 images in the pool")
    for sock in sockets:
        sock.close()
    # The running job stops between its images; the queued ones never start.
    assert wait_for_log(hostile, mark, "caller gone: stopped decoding")
    serves_normally(hostile, reference)
    after = metric_samples(hostile.http)
    cancelled = sample(after, "cnnserve_rejected_total", reason="cancelled") - sample(
        before, "cnnserve_rejected_total", reason="cancelled"
    )
    assert cancelled >= 6
    computed = sample(after, "cnnserve_images_total", model="cifar10") - sample(
        before, "cnnserve_images_total", model="cifar10"
    )
    assert computed <= 1 + 8 * (12 - cancelled)  # the normal request, and those done before their callers left
    assert "Traceback" not in log_since(hostile, mark)


def wait_for_log(server: ServerProcess, mark: int, text: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log_since(server, mark):
            return True
        time.sleep(0.05)
    return False


# ---- 4. nothing unbounded on the event loop ----------------------------------------------------
def _png_with_ztxt(chunks: int, inflated: int) -> bytes:
    info = PngImagePlugin.PngInfo()
    for i in range(chunks):
        info.add_text(f"k{i}", "\0" * inflated, zip=True)
    buf = io.BytesIO()
    Image.fromarray(distinct_images(1)[0]).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def test_png_text_chunks_that_inflate_are_refused_and_small_ones_decode(hostile, reference):
    bomb = _png_with_ztxt(60, 1_000_000)  # ~60 KB: small enough for the inline path
    assert len(bomb) < 64 * 1024
    r = httpx.post(f"{hostile.http}/predict", content=bomb, headers={"Content-Type": "image/png"})
    assert r.status_code == 400 and "cannot decode image" in r.json()["error"], r.text
    # A PNG with a little text metadata is an ordinary image.
    pixels = distinct_images(1)
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "made by a camera " * 100, zip=True)
    Image.fromarray(pixels[0]).save(buf, format="PNG", pnginfo=info)
    r = httpx.post(f"{hostile.http}/predict", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200
    assert_matches_reference(r.json()["results"][0]["predictions"], reference.probabilities(pixels)[0], 5)
    serves_normally(hostile, reference)


# ---- 5. stalled uploads, slow headers, too many connections ------------------------------------
def test_stalled_uploads_are_capped_in_memory_and_timed_out(hostile_one_process, reference):
    hostile = hostile_one_process
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
    stalled = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
    stalled.sendall(head % (3 * MIB) + b"\0" * MIB)  # 3 MiB declared, 1 MiB sent, then silence
    time.sleep(0.2)
    # 3 MiB more would take the buffered bytes past 4 MiB: 503 + Retry-After at once.
    r = httpx.post(
        f"{hostile.http}/predict", content=b"\0" * (3 * MIB), headers={"Content-Type": "image/png"}, timeout=10
    )
    assert r.status_code == 503 and r.headers["Retry-After"] == "1" and "buffered" in r.json()["error"]
    # The stalled upload is answered 408 and closed after the body timeout (1.5 s here).
    response = read_to_close(stalled)
    stalled.close()
    assert status_of(response) == 408 and "body" in json_body(response)["error"]
    serves_normally(hostile, reference)


def test_grpc_messages_count_against_the_buffered_bytes_too(hostile, reference):
    with grpc.insecure_channel(hostile.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=b"\xff\xd8\xff" + b"\0" * (5 * MIB))]), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "buffered" in info.value.details()
    serves_normally(hostile, reference)


def test_slow_headers_and_silent_connections_are_closed(hostile, reference):
    slow = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
    slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    silent = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
    response = read_to_close(slow)
    assert status_of(response) == 408 and "headers" in json_body(response)["error"]
    assert status_of(read_to_close(silent)) == 408
    slow.close()
    silent.close()
    serves_normally(hostile, reference)


def test_connections_past_the_limit_get_503(hostile_one_process, reference):
    hostile = hostile_one_process
    idle = [socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10) for _ in range(16)]
    try:
        time.sleep(0.1)
        response = raw_exchange(hostile.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(response) == 503 and "max_connections" in json_body(response)["error"]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    serves_normally(hostile, reference)


# ---- 6. admission before work -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_queue():
    """A queue of 8 images whose lone requests wait 3 s for company: easy to fill and keep full."""
    s = ServerProcess("--max-queue-size", "8", "--max-queue-delay-ms", "3000", "--drain-seconds", "0")
    yield s
    assert s.stop() == 0, s.log


def test_a_full_queue_refuses_before_the_body_is_read_or_decoded(held_queue, reference):
    s = held_queue
    raw = [pb.Image(raw=pb.RawImage(pixels=p.tobytes(), height=32, width=32)) for p in distinct_images(8, seed=3)]

    async def main():
        async with grpc.aio.insecure_channel(s.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            filler = asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(images=raw, top_k=1), timeout=30))
            await asyncio.sleep(0.3)  # the 8 images wait in the queue for 3 s
            # gRPC: RESOURCE_EXHAUSTED with a retry hint.
            call = stub.Classify(pb.ClassifyRequest(images=raw[:1], top_k=1), timeout=30)
            try:
                await call
                refused = None
            except grpc.aio.AioRpcError as e:
                refused = e
            # HTTP: headers of a 1 MiB upload, no body: refused without waiting for it.
            loop = asyncio.get_running_loop()
            head = await loop.run_in_executor(
                None,
                lambda: raw_exchange(
                    s.http_port,
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                    b"Content-Length: 1048576\r\nConnection: close\r\n\r\n",
                ),
            )
            # Garbage images that would be a 400 once decoded: refused 429 first, never decoded.
            async with httpx.AsyncClient(timeout=30) as client:
                garbage = await client.post(
                    f"{s.http}/predict", files=[("file", (f"{i}.png", b"junk", "image/png")) for i in range(3)]
                )
                v2 = await client.post(
                    f"{s.http}/v2/models/cifar10/infer",
                    json={
                        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0] * 3072}]
                    },
                )
            result = await filler
            return refused, head, garbage, v2, result

    refused, head, garbage, v2, result = asyncio.run(main())
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    pushback = dict(refused.trailing_metadata() or ())
    assert int(pushback["grpc-retry-pushback-ms"]) >= 1
    assert status_of(head) == 429 and b"retry-after:" in head.lower()
    assert garbage.status_code == 429 and int(garbage.headers["Retry-After"]) >= 1
    assert v2.status_code == 429
    assert len(result.results) == 8
    serves_normally(s, reference)


# ---- also seen ---------------------------------------------------------------------------------------
def test_a_client_that_aborts_mid_upload_is_counted_cancelled_without_a_traceback(hostile, reference):
    mark = len(hostile.lines)
    before = metric_samples(hostile.http)
    sock = socket.create_connection(("127.0.0.1", hostile.http_port), timeout=10)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    sock.sendall(b"\0" * 1000)
    time.sleep(0.2)
    sock.close()

    def counted():
        after = metric_samples(hostile.http)
        return sample(after, "cnnserve_rejected_total", reason="cancelled") - sample(
            before, "cnnserve_rejected_total", reason="cancelled"
        )

    deadline = time.monotonic() + 10
    while counted() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == 1
    text = log_since(hostile, mark)
    assert "Traceback" not in text and " ERROR " not in text
    serves_normally(hostile, reference)


def test_garbage_protobuf_is_invalid_argument_without_a_traceback(hostile, reference):
    mark = len(hostile.lines)
    with grpc.insecure_channel(hostile.grpc_target) as channel:
        for method in (
            "/cnnserve.v1.Classifier/Classify",
            "/inference.GRPCInferenceService/ModelInfer",
            "/inference.GRPCInferenceService/ModelMetadata",
            "/grpc.health.v1.Health/Check",
        ):
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                call(b"\xff\xff\xff\xff\x0f garbage", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert "not a valid message" in info.value.details()
    assert "Traceback" not in log_since(hostile, mark)
    serves_normally(hostile, reference)


def _v2_binary(server: ServerProcess, tensor: np.ndarray) -> httpx.Response:
    raw = tensor.astype("<f4").tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    return httpx.post(
        f"{server.http}/v2/models/cifar10/infer",
        content=head + raw,
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        timeout=30,
    )


def test_random_fp32_bits_are_answered_as_triton_does(hostile, reference):
    """perf_analyzer's default input is random bytes read as FP32: NaN, ±Inf and huge numbers.
    They are answered (valid JSON), and the finite image beside them gets its own answer."""
    bits = np.random.default_rng(1).integers(0, 256, (1, 3, 32, 32, 4), np.uint8).view("<f4")[..., 0]
    assert not np.isfinite(bits).all()
    pixels = distinct_images(1, seed=3)
    normalised = ((pixels / 255.0 - reference.mean) / reference.std).transpose(0, 3, 1, 2).astype(np.float32)
    r = _v2_binary(hostile, np.concatenate([bits, normalised]))
    assert r.status_code == 200, r.text
    doc = orjson.loads(r.content)  # strict JSON: no bare NaN token
    probabilities = next(o["data"] for o in doc["outputs"] if o["name"] == "probabilities")
    assert all(p is None or np.isfinite(p) for p in probabilities)
    np.testing.assert_allclose(probabilities[10:], reference.probabilities(pixels)[0], atol=0.05)  # INT8 vs FP32
    with grpc.insecure_channel(hostile.grpc_target) as channel:
        request = v2pb.ModelInferRequest(model_name="cifar10")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        request.raw_input_contents.append(bits.astype("<f4").tobytes())
        reply = v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert len(reply.raw_output_contents) == 2
    serves_normally(hostile, reference)


def test_non_finite_inputs_are_refused_when_asked_over_both_v2_bindings(hostile_one_process, reference):
    hostile = hostile_one_process  # started with --refuse-non-finite
    x = np.zeros((1, 3, 32, 32), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[0, 1, 2, 3] = bad
        r = _v2_binary(hostile, y)
        assert r.status_code == 400 and "NaN" in r.json()["error"], r.text
        with grpc.insecure_channel(hostile.grpc_target) as channel:
            request = v2pb.ModelInferRequest(model_name="cifar10")
            request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
            request.raw_input_contents.append(y.tobytes())
            with pytest.raises(grpc.RpcError) as info:
                v2pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A JSON number beyond FP32's range becomes Inf: refused too.
    data = [0.0] * 3072
    data[5] = 1e39
    r = httpx.post(
        f"{hostile.http}/v2/models/cifar10/infer",
        json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": data}]},
    )
    assert r.status_code == 400
    serves_normally(hostile, reference)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(hostile, reference, fmt):
    stored = Image.fromarray(distinct_images(1, seed=21)[0][:, :24])  # 24 wide, 32 high: not square
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    data = buf.getvalue()
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert shown.size == (32, 24)
    # What the server should compute: the shown image, centre-cropped to 24x24, resized to 32x32.
    expected = np.asarray(shown.resize((32, 32), Image.Resampling.BILINEAR, box=(4, 0, 28, 24)))
    r = httpx.post(f"{hostile.http}/predict", content=data, headers={"Content-Type": f"image/{fmt.lower()}"})
    assert r.status_code == 200, r.text
    probs = reference.probabilities(expected[None])[0]
    got = r.json()["results"][0]["predictions"]
    assert got[0]["index"] == int(np.argmax(probs))
    assert np.allclose([p["probability"] for p in got], probs[[p["index"] for p in got]], atol=2e-2)


def test_head_on_health_endpoints(hostile):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        r = httpx.head(f"{hostile.http}{path}")
        assert r.status_code == 200 and r.content == b"", path


def test_a_gzip_body_of_two_members_is_inflated_whole(hostile, reference):
    pixels = distinct_images(2, seed=30)
    x = ((pixels.astype(np.float32) / 255.0 - reference.mean) / reference.std).transpose(0, 3, 1, 2)
    doc = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": x.reshape(-1).tolist()}]}
    )
    half = len(doc) // 2
    body = gzip.compress(doc[:half]) + gzip.compress(doc[half:])
    r = httpx.post(
        f"{hostile.http}/v2/models/cifar10/infer",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 200, r.text
    probs = next(o for o in r.json()["outputs"] if o["name"] == "probabilities")["data"]
    assert np.allclose(np.reshape(probs, (2, 10)), reference.probabilities(pixels), atol=1e-5)
    # Trailing bytes that are not a gzip member are refused, not ignored.
    r = httpx.post(
        f"{hostile.http}/v2/models/cifar10/infer",
        content=gzip.compress(doc) + b"trailing junk",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    serves_normally(hostile, reference)


@pytest.fixture(scope="module")
def capped_per_client():
    s = ServerProcess(
        *("--workers", "1", "--executor", "worker", "--drain-seconds", "0"),
        *("--max-connections", "16", "--max-connections-per-client", "4", "--header-timeout-seconds", "60"),
    )
    yield s
    assert s.stop() == 0, s.log


def test_one_address_cannot_hold_every_connection_slot(capped_per_client, reference):
    """The issue: 1,100 half-sent headers from one client held every connection slot until the
    header timeout. From 127.0.0.2, 20 connections with half-sent headers (the server's
    --max-connections is 16): 4 are held (its --max-connections-per-client), the rest answered 503
    as they open, and a client from 127.0.0.1 is served meanwhile."""
    server = capped_per_client
    attacker = []
    try:
        for _ in range(20):
            sock = socket.create_connection(
                ("127.0.0.1", server.http_port), timeout=10, source_address=("127.0.0.2", 0)
            )
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            attacker.append(sock)
        refused = []
        for sock in attacker[4:]:
            response = read_to_close(sock)
            assert status_of(response) == 503, response[:200]
            refused.append(json_body(response)["error"])
        assert all("max_connections_per_client" in e for e in refused), refused[:2]
        serves_normally(server, reference)  # from 127.0.0.1, while the 4 are held
        for sock in attacker[:4]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):  # still held: no answer, not closed
                sock.recv(1)
    finally:
        for sock in attacker:
            sock.close()
    # Its slots are free again once it has closed them: the same address is served.
    assert wait_until(
        lambda: status_of(raw_exchange(server.http_port, HEALTHZ_CLOSE, source="127.0.0.2")) == 200, timeout=10
    )


HEALTHZ_CLOSE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
