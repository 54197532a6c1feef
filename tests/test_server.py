"""The server as users meet it: a real process on 127.0.0.1, real gRPC and HTTP clients, the
real model. Expected answers come from a direct onnxruntime run of the same pixels."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import MODEL_PATH, ROOT, ServerProcess, distinct_images, jpeg_bytes, png_bytes, wait_until

LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class Reference:
    """The model run directly: normalisation from the model's metadata, softmax in numpy."""

    def __init__(self):
        self.session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        pre = json.loads(meta["preprocessing"])
        self.labels = json.loads(meta["labels"])
        self.mean = np.array(pre["mean"], np.float32)
        self.std = np.array(pre["std"], np.float32)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        x = ((pixels.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(0, 3, 1, 2)
        logits = self.session.run(None, {"input": np.ascontiguousarray(x, dtype=np.float32)})[0].astype(np.float64)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def reference():
    return Reference()


def classify_grpc(target: str, images: list[pb.Image], timeout: float = 30, **fields) -> pb.ClassifyResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=images, **fields), timeout=timeout)


def metric_samples(base_url: str) -> dict[tuple, float]:
    text = httpx.get(f"{base_url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_matches_reference(result_predictions, probs_row: np.ndarray, k: int):
    order = np.argsort(-probs_row, kind="stable")[:k]
    got_idx = [p["index"] if isinstance(p, dict) else p.index for p in result_predictions]
    got_p = [p["probability"] if isinstance(p, dict) else p.probability for p in result_predictions]
    got_labels = [p["label"] if isinstance(p, dict) else p.label for p in result_predictions]
    assert got_idx[0] == order[0]
    assert np.allclose(got_p, probs_row[got_idx], atol=1e-5)
    assert np.allclose(sorted(got_p, reverse=True), probs_row[order], atol=1e-5)
    assert got_labels == [LABELS[i] for i in got_idx]


# ---------------------------------------------------------------------------------------------
def test_real_cifar_images_over_grpc_and_http_match_a_direct_onnxruntime_run(server, reference, cifar_val_sample):
    images, labels, _ = cifar_val_sample
    probs = reference.probabilities(images)
    response = classify_grpc(server.grpc_target, [pb.Image(encoded=png_bytes(im)) for im in images], top_k=3)
    assert response.model == "cifar10" and response.model_version == "1"
    assert len(response.results) == len(images)
    for result, row in zip(response.results, probs):
        assert_matches_reference(result.predictions, row, 3)
    top1 = np.array([r.predictions[0].index for r in response.results])
    assert (top1 == labels).mean() >= 0.6  # real images, real model: mostly right

    files = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(images[:10])]
    answer = httpx.post(f"{server.http}/predict", files=files, params={"top_k": 5}).json()
    for result, row in zip(answer["results"], probs[:10]):
        assert_matches_reference(result["predictions"], row, 5)


def test_every_http_body_kind_and_grpc_raw_pixels(server, reference):
    pixels = distinct_images(3, seed=1)
    probs = reference.probabilities(pixels)
    url = f"{server.http}/predict"

    r = httpx.post(url, content=png_bytes(pixels[0]), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"model", "model_version", "results"} and len(body["results"]) == 1
    assert len(body["results"][0]["predictions"]) == 5  # default top_k
    assert set(body["results"][0]["predictions"][0]) == {"label", "index", "probability"}
    assert_matches_reference(body["results"][0]["predictions"], probs[0], 5)

    # JPEG is lossy: compare with the decoded pixels, not the originals.
    jpg = jpeg_bytes(pixels[1])
    decoded = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    r = httpx.post(url, content=jpg, headers={"Content-Type": "image/jpeg"}, params={"top_k": 2})
    assert_matches_reference(r.json()["results"][0]["predictions"], reference.probabilities(decoded[None])[0], 2)

    doc = {"images": [base64.b64encode(png_bytes(p)).decode() for p in pixels], "top_k": 1}
    r = httpx.post(url, json=doc)
    assert [res["predictions"][0]["index"] for res in r.json()["results"]] == list(probs.argmax(1))

    raw = [pb.Image(raw=pb.RawImage(pixels=p.tobytes(), height=32, width=32)) for p in pixels]
    response = classify_grpc(server.grpc_target, raw, top_k=4)
    for result, row in zip(response.results, probs):
        assert_matches_reference(result.predictions, row, 4)


def test_images_of_other_sizes_and_modes_are_converted(server):
    rng = np.random.default_rng(5)
    big = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA")
    files = []
    for i, (im, fmt) in enumerate([(big, "JPEG"), (grey, "PNG"), (rgba, "PNG"), (big, "PNG")]):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        files.append(("file", (f"{i}.{fmt.lower()}", buf.getvalue(), f"image/{fmt.lower()}")))
    r = httpx.post(f"{server.http}/predict", files=files, params={"top_k": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 4
    # Same photo as JPEG and as PNG: same class after centre-crop and resize.
    res = r.json()["results"]
    assert res[0]["predictions"][0]["index"] == res[3]["predictions"][0]["index"]


def test_concurrent_requests_are_batched_and_each_caller_gets_its_own_answer(server, reference):
    pixels = distinct_images(64, seed=2)
    probs = reference.probabilities(pixels)
    before = metric_samples(server.http)

    async def main():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            calls = [
                stub.Classify(
                    pb.ClassifyRequest(
                        images=[pb.Image(raw=pb.RawImage(pixels=p.tobytes(), height=32, width=32))], top_k=3
                    ),
                    timeout=30,
                )
                for p in pixels
            ]
            return await asyncio.gather(*calls)

    responses = asyncio.run(main())
    for response, row in zip(responses, probs):
        assert len(response.results) == 1
        assert_matches_reference(response.results[0].predictions, row, 3)
    after = metric_samples(server.http)
    batches = sample(after, "cnnserve_batch_size_count", model="cifar10") - sample(
        before, "cnnserve_batch_size_count", model="cifar10"
    )
    images = sample(after, "cnnserve_batch_size_sum", model="cifar10") - sample(
        before, "cnnserve_batch_size_sum", model="cifar10"
    )
    assert images == 64
    assert batches < 64, "64 concurrent requests should have shared batches"


def test_a_client_keeping_the_advertised_streams_busy_on_one_connection_is_never_refused(server):
    """One channel (one HTTP/2 connection) keeping 100 calls in flight for 3 s, as perf_analyzer or
    tritonclient's async calls do. grpc-core counts a finished stream against MAX_CONCURRENT_STREAMS
    until the server's Python has freed it (overload protection, kept for HTTP/2 rapid reset), and a
    busy front end frees them late: with the old default of 100, a client at the advertised limit was
    refused (RST_STREAM REFUSED_STREAM -> UNAVAILABLE) in 3 of 3 such runs, and at 64 callers in 2 of 5."""
    body = pb.ClassifyRequest(images=[pb.Image(encoded=jpeg_bytes(distinct_images(1)[0]))]).SerializeToString()
    failures: list[str] = []
    answered = 0

    async def main() -> None:
        nonlocal answered
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            classify = channel.unary_unary("/cnnserve.v1.Classifier/Classify")
            end = time.monotonic() + 3

            async def caller() -> None:
                nonlocal answered
                while time.monotonic() < end:
                    try:
                        await classify(body, timeout=30)
                        answered += 1
                    except grpc.aio.AioRpcError as e:
                        failures.append(f"{e.code().name}: {e.details()}")

            await asyncio.gather(*(caller() for _ in range(100)))

    asyncio.run(main())
    assert answered >= 100
    assert not failures, f"{len(failures)} of {len(failures) + answered} calls failed, e.g. {failures[0]}"


def test_calls_whose_deadline_passes_mid_call_end_quietly(server):
    """16 callers for 4 s with deadlines of 2-8 ms, shorter than the server takes. A call its
    deadline ends before the handler has read its message is a client giving up, not an HTTP/2
    rapid reset: such calls filled the reset budget and the client's connection was shut down
    (UNAVAILABLE "Socket closed" on every call on it). And grpc-core ends a call at its deadline
    while the handler is still deciding (decoding, queued): the handler's own DEADLINE_EXCEEDED
    then has no call to go to, which grpc logged at ERROR ("ExecuteBatchError raised in core by
    servicer method", two tracebacks). Neither may happen, and the server goes on serving."""
    mark = len(server.lines)
    body = pb.ClassifyRequest(images=[pb.Image(encoded=jpeg_bytes(p)) for p in distinct_images(4, seed=9)])
    codes: dict[str, int] = {}

    async def main() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            end = time.monotonic() + 4

            async def caller(i: int) -> None:
                while time.monotonic() < end:
                    try:
                        await stub.Classify(body, timeout=0.001 * (2 + i % 7))
                        code = "OK"
                    except grpc.RpcError as e:
                        code = e.code().name
                    codes[code] = codes.get(code, 0) + 1
                    # A pause: callers that abandon calls faster than the server ends them have their
                    # new streams refused (UNAVAILABLE), as grpc-core's rapid-reset bound means to.
                    await asyncio.sleep(0.004)

            await asyncio.gather(*(caller(i) for i in range(16)))

    asyncio.run(main())
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED"}, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) > 0, codes
    time.sleep(0.5)  # the server's last lines reach the reader thread
    logged = [line for line in server.lines[mark:] if "ERROR" in line or "Traceback" in line]
    assert not logged, logged[:4]
    assert len(classify_grpc(server.grpc_target, list(body.images)).results) == 4


HTTP_BAD = [
    ("garbage png", dict(content=b"not an image at all", headers={"Content-Type": "image/png"}), 400),
    ("empty body", dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400),
    ("truncated jpeg", dict(content=b"\xff\xd8\xff\xe0" + b"\x00" * 50, headers={"Content-Type": "image/jpeg"}), 400),
    ("text body", dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415),
    ("json not json", dict(content=b"{nope", headers={"Content-Type": "application/json"}), 400),
    ("json no images", dict(json={"pictures": []}), 400),
    ("json empty images", dict(json={"images": []}), 400),
    ("json bad base64", dict(json={"images": ["@@@"]}), 400),
    ("json number image", dict(json={"images": [3]}), 400),
    (
        "json top_k string",
        dict(json={"images": [base64.b64encode(png_bytes(distinct_images(1)[0])).decode()], "top_k": "five"}),
        422,
    ),
    ("multipart without file", dict(files={"other": ("a.png", b"x", "image/png")}), 400),
    ("multipart without boundary", dict(content=b"--x\r\n", headers={"Content-Type": "multipart/form-data"}), 400),
    (
        "multipart file field without filename",
        dict(
            content=b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--b--\r\n',
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        ),
        400,
    ),
    (
        "multipart 257 files",
        dict(files=[("file", (f"{i}.png", b"x", "image/png")) for i in range(257)]),
        413,
    ),
]


@pytest.mark.parametrize("name,kwargs,status", HTTP_BAD, ids=[c[0] for c in HTTP_BAD])
def test_http_bad_input_gets_its_code_and_a_json_error(server, name, kwargs, status):
    r = httpx.post(f"{server.http}/predict", **kwargs)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_a_non_image_upload_says_which_formats_are_accepted(server, tmp_path):
    for kwargs in (
        dict(content=b"%PDF-1.7 not an image", headers={"Content-Type": "application/octet-stream"}),
        dict(files={"file": ("notes.txt", b"plain text, not an image", "text/plain")}),
    ):
        r = httpx.post(f"{server.http}/predict", **kwargs)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "send JPEG or PNG (also GIF, BMP" in error and "BytesIO" not in error and " at 0x" not in error
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "classify", str(path), "--target", server.grpc_target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "send JPEG or PNG" in out.stderr and "BytesIO" not in out.stderr


@pytest.mark.parametrize(
    "params,status",
    [
        ({"top_k": 0}, 422),
        ({"top_k": 11}, 422),
        ({"top_k": "abc"}, 422),
        ({"model": "nope"}, 404),
        ({"version": "9"}, 404),
    ],
)
def test_http_bad_parameters(server, params, status):
    r = httpx.post(
        f"{server.http}/predict",
        params=params,
        content=png_bytes(distinct_images(1)[0]),
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == status, r.text
    assert "error" in r.json()


def _photo(width: int, height: int, **save) -> bytes:
    """A camera-sized JPEG: a smooth scene (small noise upscaled), so the file stays a few MB."""
    scene = Image.fromarray(np.random.default_rng(7).integers(0, 256, (30, 45, 3), np.uint8))
    buf = io.BytesIO()
    scene.resize((width, height), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def test_multipart_answers_and_errors_name_the_files(server):
    a, b = (png_bytes(p) for p in distinct_images(2, seed=5))
    files = [("file", ("cat.png", a, "image/png")), ("file", ("dog.png", b, "image/png"))]
    r = httpx.post(f"{server.http}/predict", files=files, timeout=30)
    assert r.status_code == 200, r.text
    assert [res["file"] for res in r.json()["results"]] == ["cat.png", "dog.png"]
    r = httpx.post(f"{server.http}/predict", files=[files[0], ("file", ("notes.txt", b"hello", "text/plain"))])
    assert r.status_code == 400 and r.json()["error"].startswith("image 1 (notes.txt): "), r.text
    # Other body kinds have no file names: no "file" key.
    r = httpx.post(f"{server.http}/predict", content=a, headers={"Content-Type": "image/png"})
    assert "file" not in r.json()["results"][0]


def test_a_24_megapixel_camera_photo_is_classified_like_a_12_megapixel_one(server):
    """Over max_image_pixels (16.7 M) by its header, but a sequential JPEG is decoded at 1/8 scale
    (750x500): bounded by what that costs. A progressive one, whose decoder holds every coefficient
    of the full image, keeps the header bound (and a PNG, which decodes fully)."""
    url = f"{server.http}/predict"
    answers = []
    for size in ((6000, 4000), (4000, 3000)):
        r = httpx.post(url, content=_photo(*size), headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text
        answers.append({p["index"]: p["probability"] for p in r.json()["results"][0]["predictions"]})
    assert max(answers[0], key=answers[0].get) == max(answers[1], key=answers[1].get)
    r = httpx.post(url, content=_photo(6000, 4000, progressive=True), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "6000x4000 = 24000000 pixels" in r.json()["error"], r.text
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=_photo(6000, 4000))]), timeout=30
        )
    assert len(reply.results[0].predictions) == 5


def test_http_limits_and_unknown_routes(server):
    url = f"{server.http}/predict"
    # Over max_request_bytes (16 MiB by default): refused from the Content-Length alone.
    r = httpx.post(url, content=b"\xff\xd8\xff" + b"\x00" * (17 * 1024 * 1024), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and "error" in r.json()
    # A decompression bomb: tiny PNG, 5000x5000 pixels > max_image_pixels (4096*4096).
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    r = httpx.post(url, content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "pixels" in r.json()["error"]
    r = httpx.post(
        url,
        content=png_bytes(distinct_images(1)[0]),
        headers={"Content-Type": "image/png", "X-Request-Timeout-Ms": "soon"},
    )
    assert r.status_code == 422
    r = httpx.get(f"{server.http}/no/such/route")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(url)
    assert r.status_code == 405 and "error" in r.json()


GRPC_BAD = [
    ("no source", dict(images=[pb.Image()]), grpc.StatusCode.INVALID_ARGUMENT),
    ("no images", dict(images=[]), grpc.StatusCode.INVALID_ARGUMENT),
    ("garbage bytes", dict(images=[pb.Image(encoded=b"garbage")]), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "raw wrong length",
        dict(images=[pb.Image(raw=pb.RawImage(pixels=b"\x00" * 10, height=32, width=32))]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "raw zero size",
        dict(images=[pb.Image(raw=pb.RawImage(pixels=b"", height=0, width=0))]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "top_k zero",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], top_k=0),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "top_k eleven",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], top_k=11),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "unknown model",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], model="resnet"),
        grpc.StatusCode.NOT_FOUND,
    ),
    (
        "unknown version",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], model_version="7"),
        grpc.StatusCode.NOT_FOUND,
    ),
    ("too many images", dict(images=[pb.Image(encoded=b"x")] * 257), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (
        "message too large",
        dict(images=[pb.Image(encoded=b"\x00" * (17 * 1024 * 1024))]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
]


@pytest.mark.parametrize("name,fields,code", GRPC_BAD, ids=[c[0] for c in GRPC_BAD])
def test_grpc_bad_input_gets_its_status(server, name, fields, code):
    with pytest.raises(grpc.RpcError) as info:
        classify_grpc(server.grpc_target, **fields)
    assert info.value.code() == code
    assert info.value.details()


def test_server_still_serves_after_bad_input(server):
    # Runs after the bad-input tests in file order; also hammer it once more here.
    for _ in range(3):
        httpx.post(f"{server.http}/predict", content=b"junk", headers={"Content-Type": "image/png"})
    response = classify_grpc(server.grpc_target, [pb.Image(encoded=png_bytes(distinct_images(1)[0]))], top_k=1)
    assert len(response.results[0].predictions) == 1
    assert server.proc.poll() is None


def test_health_reflection_and_metrics(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cnnserve.v1.Classifier"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"cnnserve.v1.Classifier", "grpc.health.v1.Health"} <= names

    assert httpx.get(f"{server.http}/healthz").json() == {"status": "live"}
    ready = httpx.get(f"{server.http}/readyz")
    assert ready.status_code == 200 and ready.json()["models"][0]["name"] == "cifar10"
    assert httpx.get(f"{server.http}/docs").status_code == 200
    assert "/predict" in httpx.get(f"{server.http}/openapi.json").json()["paths"]

    before = metric_samples(server.http)
    image = png_bytes(distinct_images(1)[0])
    classify_grpc(server.grpc_target, [pb.Image(encoded=image)])
    httpx.post(f"{server.http}/predict", content=image, headers={"Content-Type": "image/png"})
    httpx.post(f"{server.http}/predict", content=b"bad", headers={"Content-Type": "image/png"})
    after = metric_samples(server.http)

    def moved(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("cnnserve_requests_total", protocol="grpc", method="Classify", code="OK") == 1
    assert moved("cnnserve_requests_total", protocol="http", method="predict", code="200") == 1
    assert moved("cnnserve_requests_total", protocol="http", method="predict", code="400") == 1
    assert moved("cnnserve_rejected_total", reason="invalid") == 1
    assert moved("cnnserve_images_total", model="cifar10") == 2
    assert moved("cnnserve_request_duration_seconds_count", protocol="grpc", method="Classify") == 1
    assert moved("cnnserve_inference_duration_seconds_count", model="cifar10") >= 1
    assert moved("cnnserve_queue_duration_seconds_count", model="cifar10") == 2
    providers = [dict(k[1]).get("provider") for k in after if k[0] == "cnnserve_model_info"]
    assert providers and all(p.endswith("ExecutionProvider") for p in providers)
    assert sample(after, "cnnserve_queue_depth", model="cifar10") == 0


def test_cli_classify_over_grpc_and_http(server, tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(distinct_images(1, seed=9)[0]))
    for extra in (["--target", server.grpc_target], ["--http", "--target", f"127.0.0.1:{server.http_port}"]):
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "classify", str(path), "--top-k", "2", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "model cifar10 version 1" in out.stdout
        line = next(l for l in out.stdout.splitlines() if l.startswith(str(path)))
        assert line.count("%") == 2 and any(label in line for label in LABELS)
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "classify", str(path), "--top-k", "0", "--target", server.grpc_target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    # A bad file among several: the error names the file, not the server's "image 1".
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    for extra in (["--target", server.grpc_target], ["--http", "--target", f"127.0.0.1:{server.http_port}"]):
        out = subprocess.run(
            [sys.executable, "-m", "service.cli", "classify", str(path), str(notes), *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 1 and f"{notes}: not an image" in out.stderr, out.stderr
        assert "image 1" not in out.stderr


def test_readiness_is_false_until_the_model_is_loaded_and_warm(tmp_path):
    # The model file is a pipe: loading blocks until the test writes the model into it.
    version_dir = tmp_path / "cifar10" / "1"
    version_dir.mkdir(parents=True)
    os.mkfifo(version_dir / "model.onnx")
    s = ServerProcess("--model-repository", str(tmp_path), "--drain-seconds", "0", wait_ready=False)
    try:
        assert httpx.get(f"{s.http}/healthz").status_code == 200
        r = httpx.get(f"{s.http}/readyz")
        assert r.status_code == 503 and "loading" in r.json()["error"]
        r = httpx.post(
            f"{s.http}/predict", content=png_bytes(distinct_images(1)[0]), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 503
        with grpc.insecure_channel(s.grpc_target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="")).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as info:
            classify_grpc(s.grpc_target, [pb.Image(encoded=png_bytes(distinct_images(1)[0]))])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        writer = threading.Thread(target=lambda: (version_dir / "model.onnx").write_bytes(MODEL_PATH.read_bytes()))
        writer.start()
        s.wait_ready(60)
        writer.join(10)
        assert httpx.get(f"{s.http}/readyz").status_code == 200
        # A multi-process server's front ends follow the shared readiness within 50 ms.
        with grpc.insecure_channel(s.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            assert wait_until(
                lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status == serving, timeout=2
            )
    finally:
        assert s.stop() == 0


@pytest.fixture(scope="module")
def slow_server():
    """Batches of one image and a 600-image queue: easy to fill, slow to drain."""
    s = ServerProcess("--max-batch-size", "1", "--max-queue-size", "600", "--drain-seconds", "0")
    yield s
    assert s.stop() == 0


def _multipart(n: int, seed: int) -> list:
    return [("file", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(distinct_images(n, seed))]


def test_full_queue_answers_429_and_resource_exhausted_and_no_5xx(slow_server):
    big = _multipart(256, seed=3)

    async def http_flood():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{slow_server.http}/predict", files=big) for _ in range(4)))

    responses = asyncio.run(http_flood())
    codes = sorted(r.status_code for r in responses)
    assert 429 in codes and 200 in codes and all(c in (200, 429) for c in codes), codes
    rejected = [r for r in responses if r.status_code == 429]
    assert int(rejected[0].headers["Retry-After"]) >= 1 and "queue full" in rejected[0].json()["error"]

    raw = [pb.Image(raw=pb.RawImage(pixels=p.tobytes(), height=32, width=32)) for p in distinct_images(256, seed=4)]

    async def grpc_flood():
        async with grpc.aio.insecure_channel(slow_server.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            calls = [stub.Classify(pb.ClassifyRequest(images=raw, top_k=1), timeout=120) for _ in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(grpc_flood())
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert errors and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in errors)
    assert any(isinstance(o, pb.ClassifyResponse) for o in outcomes)
    assert slow_server.proc.poll() is None


def test_a_stream_has_at_most_its_share_of_requests_in_progress(slow_server):
    """500 v2 requests sent at once on one ModelStreamInfer call to a server computing one image
    a batch: the server reads the stream only while fewer than 64 of its requests are in progress
    (service/grpc_api/stream_infer.py IN_FLIGHT), so the model's queue never holds more than that
    (read all at once, it would hold hundreds) and every request is answered."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="cifar10")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(np.zeros((1, 3, 32, 32), np.float32).tobytes())
    depths: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            depths.append(sample(metric_samples(slow_server.http), "cnnserve_queue_depth", model="cifar10"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with grpc.insecure_channel(slow_server.grpc_target) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            answers = list(stub.ModelStreamInfer(iter([request] * 500), timeout=60))
    finally:
        done.set()
        watcher.join()
    assert len(answers) == 500 and not [a.error_message for a in answers if a.error_message]
    assert max(depths) <= 64, sorted(depths)[-5:]
    assert max(depths) >= 8, depths  # the stream did fill the queue while it was watched


def test_a_request_whose_deadline_passes_in_the_queue_is_not_computed(slow_server):
    blockers = [pb.Image(raw=pb.RawImage(pixels=p.tobytes(), height=32, width=32)) for p in distinct_images(256, 6)]
    before = metric_samples(slow_server.http)

    async def main():
        async with grpc.aio.insecure_channel(slow_server.grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            slow = [stub.Classify(pb.ClassifyRequest(images=blockers, top_k=1), timeout=120) for _ in range(2)]
            tasks = [asyncio.ensure_future(c) for c in slow]
            await asyncio.sleep(0.05)  # the 512 blocker images are queued now
            late = stub.Classify(pb.ClassifyRequest(images=blockers[:1], top_k=1), timeout=0.02)
            async with httpx.AsyncClient(timeout=60) as client:
                http_late = client.post(
                    f"{slow_server.http}/predict",
                    content=png_bytes(distinct_images(1)[0]),
                    headers={"Content-Type": "image/png", "X-Request-Timeout-Ms": "20"},
                )
                results = await asyncio.gather(late, http_late, return_exceptions=True)
            # A timer answers at the deadline: the late ones are answered while the blockers still run.
            blockers_done = sum(t.done() for t in tasks)
            await asyncio.gather(*tasks)
            return (*results, blockers_done)

    late_grpc, late_http, blockers_done = asyncio.run(main())
    assert isinstance(late_grpc, grpc.RpcError) and late_grpc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert late_http.status_code == 504 and "deadline" in late_http.json()["error"]
    assert blockers_done == 0
    after = metric_samples(slow_server.http)
    assert (
        sample(after, "cnnserve_images_total", model="cifar10")
        - sample(before, "cnnserve_images_total", model="cifar10")
        == 512
    )  # the late ones never ran
    # The HTTP one was queued and dropped; the gRPC one too, unless grpc itself expired it first.
    assert (
        sample(after, "cnnserve_rejected_total", reason="deadline")
        - sample(before, "cnnserve_rejected_total", reason="deadline")
        >= 1
    )


def test_a_caller_that_goes_away_is_dropped_before_compute():
    import socket

    # A lone request waits up to 1.5 s for company: ample time to hang up while it is queued.
    s = ServerProcess("--max-queue-delay-ms", "1500", "--drain-seconds", "0")
    try:
        image = png_bytes(distinct_images(1, seed=8)[0])
        before = metric_samples(s.http)
        sock = socket.create_connection(("127.0.0.1", s.http_port))
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: %d\r\n\r\n" % len(image) + image
        )
        time.sleep(0.2)
        sock.close()
        with grpc.insecure_channel(s.grpc_target) as channel:
            call = pb_grpc.ClassifierStub(channel).Classify.future(
                pb.ClassifyRequest(images=[pb.Image(encoded=image)], top_k=1), timeout=30
            )
            time.sleep(0.2)
            call.cancel()
        time.sleep(1.8)  # past the queue delay: the batcher has looked at (and dropped) both
        after = metric_samples(s.http)
        assert (
            sample(after, "cnnserve_rejected_total", reason="cancelled")
            - sample(before, "cnnserve_rejected_total", reason="cancelled")
            == 2
        )
        assert sample(after, "cnnserve_images_total", model="cifar10") == sample(
            before, "cnnserve_images_total", model="cifar10"
        )  # neither was computed
        # Still serving, and the delay holds a lone request back for company.
        started = time.monotonic()
        assert len(classify_grpc(s.grpc_target, [pb.Image(encoded=image)], top_k=2).results) == 1
        assert time.monotonic() - started >= 1.2
    finally:
        assert s.stop() == 0


def test_chunked_uploads_without_content_length(server):
    boundary = "cnnservetestboundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + png_bytes(p)
        + b"\r\n"
        for i, p in enumerate(distinct_images(2, seed=11))
    )
    body = parts + f"--{boundary}--\r\n".encode()

    def chunks(data: bytes):
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = httpx.post(
        f"{server.http}/predict",
        content=chunks(body),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2
    r = httpx.post(
        f"{server.http}/predict",
        content=chunks(png_bytes(distinct_images(1)[0])),
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_pipelined_requests_and_connection_close_are_answered_whole(server):
    """Raw HTTP/1.1 on one socket: two pipelined /predict requests, then one with Connection:
    close. Each answer arrives whole, in order, and the server closes after the last."""
    import socket

    image = png_bytes(distinct_images(1, seed=12)[0])
    head = b"POST /predict?top_k=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: %d\r\n" % len(
        image
    )
    wire = head + b"\r\n" + image + head + b"\r\n" + image + head + b"Connection: close\r\n\r\n" + image
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(wire)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes
            received += chunk
    answers = []
    while received:
        top, _, rest = received.partition(b"\r\n\r\n")
        length = int(top.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        answers.append((top.split(b" ")[1], json.loads(rest[:length])))
        received = rest[length:]
    assert [status for status, _ in answers] == [b"200"] * 3, answers
    assert all(len(body["results"][0]["predictions"]) == 1 for _, body in answers)


def test_a_request_larger_than_the_queue_is_413_not_429():
    s = ServerProcess("--max-queue-size", "4", "--drain-seconds", "0")
    try:
        files = [("file", (f"{i}.png", png_bytes(p), "image/png")) for i, p in enumerate(distinct_images(5))]
        r = httpx.post(f"{s.http}/predict", files=files)
        assert r.status_code == 413 and "capacity" in r.json()["error"]
        r = httpx.post(f"{s.http}/predict", files=files[:4])
        assert r.status_code == 200 and len(r.json()["results"]) == 4
    finally:
        assert s.stop() == 0


def _serve_fails(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``cnnserve serve`` that must fail at start-up; its stderr must be our lines only."""
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--providers", "cpu", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr, out.stderr
    return out


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_port_in_use_is_one_clear_line(workers, protocol):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = "--grpc-port" if protocol == "http" else "--http-port"
        out = _serve_fails("--workers", workers, f"--{protocol}-port", str(port), other, "0")
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr
    assert f"port {port} is already in use on 127.0.0.1" in errors[0] and f"--{protocol}-port" in errors[0]
    assert f"CNNSERVE_{protocol.upper()}_PORT" in errors[0]
    assert "GRPC_VERBOSITY" not in out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_missing_model_repository_is_named_by_its_absolute_path(tmp_path, workers):
    out = _serve_fails("--workers", workers, "--model-repository", "no-such-models", cwd=tmp_path)
    assert f"model repository {tmp_path / 'no-such-models'} is not a folder" in out.stderr, out.stderr


@pytest.mark.parametrize("workers,executor", [("1", "worker"), ("2", "worker"), ("2", "device")])
def test_a_corrupt_model_is_one_line_naming_the_file(tmp_path, workers, executor):
    """Checked once before any process starts: not one ONNX Runtime error per front end."""
    version_dir = tmp_path / "cifar10" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(MODEL_PATH.read_bytes()[:5000])  # cut short
    out = _serve_fails(
        "--workers",
        workers,
        "--executor",
        executor,
        "--model-repository",
        str(tmp_path),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
    )
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr
    assert f"model file {version_dir / 'model.onnx'} is not an ONNX model (truncated" in errors[0], out.stderr
    assert "listening" not in out.stderr and "Shutting down" not in out.stderr, out.stderr


def test_a_model_onnx_runtime_cannot_load_is_one_line_naming_the_file(tmp_path):
    """Protobuf-shaped, so past the start-up check, but no valid graph: ONNX Runtime's error."""
    version_dir = tmp_path / "cifar10" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(b"\x08\x07" + b"\x3a\x04" + b"\xff" * 4)  # ir_version, graph: junk
    out = _serve_fails("--workers", "1", "--model-repository", str(tmp_path), "--http-port", "0", "--grpc-port", "0")
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out.stderr
    assert f"cannot load {version_dir / 'model.onnx'}" in errors[0], out.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_second_ctrl_c_stops_at_once(workers):
    s = ServerProcess("--workers", workers, "--drain-seconds", "30")
    children = list(s.children.values())
    s.proc.send_signal(signal.SIGINT)
    assert wait_until(lambda: "Ctrl-C again stops now" in s.log, timeout=10), s.log
    assert httpx.get(f"{s.http}/readyz").status_code == 503  # draining, still answering
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(10) == 130  # well inside the 30 s drain: it did not wait for it
    assert s.wait_output(), s.log  # the exit does not mean the reader has the last line yet
    assert "second Ctrl-C: stopping now" in s.log
    for pid in children:  # no process outlives the server
        assert wait_until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), timeout=5)


def _is_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
