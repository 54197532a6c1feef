"""/explain, gRPC Explain, the layers as Open Inference Protocol outputs, and the page's files:
a real server on 127.0.0.1, real HTTP and gRPC clients, the real model."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.http_api.schemas import ExplainResponse
from tests.conftest import ROOT, SHARED_CIFAR, ServerProcess, distinct_images, png_bytes, wait_until
from tests.test_server import GRPC_BAD, HTTP_BAD, Reference, metric_samples, sample

LAYER_SHAPES = {"conv1": [32, 32, 32], "conv2": [32, 32, 32], "pool": [32, 16, 16], "fc3": [512], "fc4": [10]}
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def reference():
    return Reference()


def explain_grpc(address: str, timeout: float = 30, **fields) -> pb.ExplainResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.ClassifierStub(channel).Explain(pb.ExplainRequest(**fields), timeout=timeout)


def decode_png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("RGB"))


def test_http_explanation_shapes_names_and_predictions(server, reference):
    image = distinct_images(1, seed=11)[0]
    r = httpx.post(f"{server.http}/explain", params={"top_k": 3}, content=png_bytes(image), headers=PNG, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    ExplainResponse.model_validate(doc)  # the documented schema (OpenAPI)
    assert doc["model"] == "cifar10" and doc["model_version"] == "1" and len(doc["results"]) == 1
    result = doc["results"][0]
    probs = reference.probabilities(image[None])[0]
    order = np.argsort(-probs)[:3]
    assert [p["index"] for p in result["predictions"]] == order.tolist()
    np.testing.assert_allclose([p["probability"] for p in result["predictions"]], probs[order], atol=1e-5)
    a = result["attribution"]
    assert a["method"] == "occlusion" and a["class_index"] == int(order[0])
    assert a["label"] == result["predictions"][0]["label"]
    assert (a["height"], a["width"]) == (32, 32)
    assert len(a["values"]) == 32 and all(len(row) == 32 for row in a["values"])
    assert np.abs(np.array(a["values"])).max() > 0
    layers = result["layers"]
    assert [layer["name"] for layer in layers] == list(LAYER_SHAPES)
    for layer in layers:
        assert layer["shape"] == LAYER_SHAPES[layer["name"]] and layer["description"]
    by_name = {layer["name"]: layer for layer in layers}
    assert len(by_name["conv1"]["filters"]) == 32 and decode_png(by_name["conv1"]["filters"][0]).shape == (3, 3, 3)
    for name in ("conv1", "conv2", "pool"):
        assert len(by_name[name]["maps"]) == 32 and len(by_name[name]["maxima"]) == 32
        side = LAYER_SHAPES[name][1]
        assert decode_png(by_name[name]["maps"][5]).shape == (side, side, 3)
    assert len(by_name["fc3"]["values"]) == 512 and min(by_name["fc3"]["values"]) >= 0
    logits = np.array(by_name["fc4"]["values"])
    np.testing.assert_allclose(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum(), probs, atol=1e-5)


def test_target_method_seed_and_every_body_kind(server):
    images = distinct_images(2, seed=12)
    body = {"images": [base64.b64encode(png_bytes(i)).decode() for i in images], "target": 4, "method": "rise"}
    r = httpx.post(f"{server.http}/explain", json={**body, "seed": 3}, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    assert all(x["attribution"]["class_index"] == 4 and x["attribution"]["label"] == "deer" for x in results)
    assert all(x["attribution"]["method"] == "rise" for x in results)
    again = httpx.post(f"{server.http}/explain", json={**body, "seed": 3}, timeout=30).json()["results"]
    other = httpx.post(f"{server.http}/explain", json={**body, "seed": 4}, timeout=30).json()["results"]
    assert again[0]["attribution"]["values"] == results[0]["attribution"]["values"]
    assert other[0]["attribution"]["values"] != results[0]["attribution"]["values"]
    files = [("file", ("a.png", png_bytes(images[0]), "image/png"))]
    r = httpx.post(f"{server.http}/explain", params={"target": 4, "method": "rise", "seed": 3}, files=files, timeout=30)
    assert (
        r.status_code == 200 and r.json()["results"][0]["attribution"]["values"] == results[0]["attribution"]["values"]
    )


@pytest.mark.parametrize("name,kwargs,status", HTTP_BAD, ids=[c[0] for c in HTTP_BAD])
def test_every_predict_error_answers_the_same_on_explain(server, name, kwargs, status):
    predict = httpx.post(f"{server.http}/predict", **kwargs)
    explain = httpx.post(f"{server.http}/explain", **kwargs)
    assert explain.status_code == predict.status_code == status, explain.text
    # The same message, but for the address of Pillow's buffer object that some of them name.
    assert re.sub("0x[0-9a-f]+", "", explain.json()["error"]) == re.sub("0x[0-9a-f]+", "", predict.json()["error"])


@pytest.mark.parametrize(
    "params,status",
    [
        ({"top_k": 0}, 422),
        ({"top_k": "abc"}, 422),
        ({"model": "nope"}, 404),
        ({"version": "9"}, 404),
        ({"target": 10}, 422),
        ({"target": -1}, 422),
        ({"target": "cat"}, 422),
        ({"method": "gradcam"}, 422),
        ({"seed": "x"}, 422),
        ({"seed": -1}, 422),
    ],
)
def test_explain_bad_parameters(server, params, status):
    r = httpx.post(f"{server.http}/explain", params=params, content=png_bytes(distinct_images(1)[0]), headers=PNG)
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_explain_http_limits(server):
    url = f"{server.http}/explain"
    five = [("file", (f"{i}.png", png_bytes(im), "image/png")) for i, im in enumerate(distinct_images(5))]
    r = httpx.post(url, files=five)
    assert r.status_code == 413 and "limit is 4" in r.json()["error"]
    r = httpx.post(url, content=png_bytes(distinct_images(1)[0]), headers={**PNG, "X-Request-Timeout-Ms": "soon"})
    assert r.status_code == 422
    assert httpx.post(url, json={"images": [], "target": True}).status_code in (400, 422)
    assert httpx.get(url).status_code == 405


def test_grpc_explain(server, reference):
    image = distinct_images(1, seed=13)[0]
    response = explain_grpc(server.grpc_target, images=[pb.Image(encoded=png_bytes(image))], top_k=2, target=1)
    assert response.model == "cifar10" and len(response.results) == 1
    result = response.results[0]
    probs = reference.probabilities(image[None])[0]
    assert [p.index for p in result.predictions] == np.argsort(-probs)[:2].tolist()
    a = result.attribution
    assert (a.method, a.class_index, a.label, a.height, a.width) == ("occlusion", 1, "automobile", 32, 32)
    assert len(a.values) == 32 * 32
    assert [layer.name for layer in result.layers] == list(LAYER_SHAPES)
    conv1 = result.layers[0]
    assert list(conv1.shape) == [32, 32, 32] and len(conv1.maps) == 32 and len(conv1.filters) == 32
    assert conv1.maps[0].startswith(b"\x89PNG")
    assert len(result.layers[3].values) == 512
    raw = pb.Image(raw=pb.RawImage(pixels=image.tobytes(), height=32, width=32))
    same = explain_grpc(server.grpc_target, images=[raw], top_k=2, target=1).results[0]
    assert list(same.attribution.values) == list(a.values)


EXPLAIN_GRPC_BAD = [
    *GRPC_BAD,
    (
        "target ten",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], target=10),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "unknown method",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))], method="lime"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "five images",
        dict(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))] * 5),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ),
]


@pytest.mark.parametrize("name,fields,code", EXPLAIN_GRPC_BAD, ids=[c[0] for c in EXPLAIN_GRPC_BAD])
def test_grpc_explain_bad_input_gets_its_status(server, name, fields, code):
    with pytest.raises(grpc.RpcError) as info:
        explain_grpc(server.grpc_target, **fields)
    assert info.value.code() == code


def test_layers_as_open_inference_protocol_outputs(server, reference):
    meta = httpx.get(f"{server.http}/v2/models/cifar10").json()
    outputs = {o["name"]: o["shape"] for o in meta["outputs"]}
    # Metadata and configuration list the model's own outputs only (perf_analyzer requests every
    # listed output); the configuration's parameters describe the layers.
    assert outputs == {"logits": [-1, 10], "probabilities": [-1, 10]}
    config = httpx.get(f"{server.http}/v2/models/cifar10/config").json()
    layers = json.loads(config["parameters"]["layer_outputs"]["string_value"])
    assert {o["name"]: o["shape"] for o in layers["outputs"]}["pool"] == [-1, 32, 16, 16]
    assert "Dropout" in layers["description"]
    pixels = distinct_images(2, seed=14)
    x = ((pixels.astype(np.float32) / 255.0 - reference.mean) / reference.std).transpose(0, 3, 1, 2)
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": x.ravel().tolist()}],
        "outputs": [{"name": "pool"}, {"name": "fc4"}, {"name": "logits"}],
    }
    r = httpx.post(f"{server.http}/v2/models/cifar10/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    got = {o["name"]: o for o in r.json()["outputs"]}
    assert got["pool"]["shape"] == [2, 32, 16, 16] and len(got["pool"]["data"]) == 2 * 32 * 16 * 16
    np.testing.assert_allclose(got["fc4"]["data"], got["logits"]["data"], atol=1e-5)
    body["outputs"] = [{"name": "conv1", "parameters": {"classification": 3}}]
    assert httpx.post(f"{server.http}/v2/models/cifar10/infer", json=body).status_code == 400
    body["outputs"] = [{"name": "conv9"}]
    assert httpx.post(f"{server.http}/v2/models/cifar10/infer", json=body).status_code == 400


def test_the_page_and_its_files_are_served(server):
    page = httpx.get(f"{server.http}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Offline: every script and stylesheet comes from this server.
    assert re.findall(r'<script src="([^"]+)"', page.text) == ["/static/app.js"]
    assert re.findall(r'<link rel="stylesheet" href="([^"]+)"', page.text) == ["/static/style.css"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server.http}/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    assert httpx.get(f"{server.http}/static/nope.js").status_code == 404
    assert "/explain" in httpx.get(f"{server.http}/openapi.json").json()["paths"]
    samples = httpx.get(f"{server.http}/samples", timeout=60).json()
    if not SHARED_CIFAR.exists():
        assert samples["samples"] == []
        return
    assert [s["label"] for s in samples["samples"]] == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert "validation" in samples["source"]
    png = httpx.get(f"{server.http}{samples['samples'][3]['url']}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert httpx.get(f"{server.http}/samples/10.png").status_code == 404
    assert httpx.get(f"{server.http}/samples/x.png").json()["error"]


@pytest.fixture(scope="module")
def busy_server():
    """One explanation at a time, none waiting; a long batching delay keeps each one in flight.
    One process: the explanations' limits hold per front-end process."""
    s = ServerProcess(
        "--workers",
        "1",
        "--drain-seconds",
        "0",
        "--explain-concurrency",
        "1",
        "--explain-queue-size",
        "0",
        "--max-queue-delay-ms",
        "1500",
    )
    yield s
    assert s.stop() == 0, s.log


def test_explanations_past_their_limits_are_refused_at_once_and_predict_still_runs(busy_server):
    url = busy_server.http
    image = png_bytes(distinct_images(1, seed=15)[0])
    first: dict = {}

    def slow():
        first["response"] = httpx.post(f"{url}/explain", content=image, headers=PNG, timeout=60)

    worker = threading.Thread(target=slow)
    worker.start()
    assert wait_until(lambda: sample(metric_samples(url), "cnnserve_explanations_active") == 1, timeout=20)
    refused = httpx.post(f"{url}/explain", content=image, headers=PNG, timeout=10)
    assert refused.status_code == 429 and "Retry-After" in refused.headers and "busy" in refused.json()["error"]
    with pytest.raises(grpc.RpcError) as info:
        explain_grpc(busy_server.grpc_target, images=[pb.Image(encoded=image)], timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert httpx.post(f"{url}/predict", content=image, headers=PNG, timeout=30).status_code == 200
    worker.join(60)
    assert first["response"].status_code == 200
    metrics = metric_samples(url)
    assert sample(metrics, "cnnserve_rejected_total", reason="explain_busy") == 2
    assert sample(metrics, "cnnserve_explanations_total", method="occlusion") == 1
    assert sample(metrics, "cnnserve_requests_total", protocol="http", method="explain", code="429") == 1
    assert sample(metrics, "cnnserve_requests_total", protocol="grpc", method="Explain", code="RESOURCE_EXHAUSTED") == 1


def test_bench_explain_smoke(tmp_path):
    """bench/explain.py runs end to end (its figures are for a quiet machine, not asserted here)."""
    out = tmp_path / "explain.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "explain.py"), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert set(result["latency"]) == {"occlusion", "rise"}
    assert result["latency"]["occlusion"]["requests"] == 3 and result["latency"]["occlusion"]["p50_ms"] > 0
    assert result["deletion_test"]["occlusion"]["images"] == 5


def test_readme_explain_curl_commands_run(server, tmp_path):
    """The README's /explain curl lines, run as written against a real server."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    readme = (ROOT / "README.md").read_text()
    commands = [line[2:] for line in readme.splitlines() if line.startswith("$ curl") and "/explain" in line]
    assert len(commands) >= 2
    (tmp_path / "cat.png").write_bytes(png_bytes(distinct_images(1, seed=16)[0]))
    for command in commands:
        command = command.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
        out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)["results"][0]
        assert result["attribution"]["height"] == 32 and [layer["name"] for layer in result["layers"]] == list(
            LAYER_SHAPES
        )
