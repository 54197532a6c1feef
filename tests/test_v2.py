"""Open Inference Protocol (KServe v2 + Triton extensions), end to end: tritonclient (HTTP, gRPC,
sync and asyncio) against a real ``cnnserve serve`` subprocess on ephemeral ports, with the
outputs checked against a direct onnxruntime run of the bundled model."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import tritonclient.http.aio as thttp_aio
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import MODEL_PATH, ServerProcess

MODEL = "cifar10"
# The layers of the bundled layers.onnx, extra outputs asked for by name (tests/test_explain.py).
LAYER_OUTPUTS = [
    ("conv1", [-1, 32, 32, 32]),
    ("conv2", [-1, 32, 32, 32]),
    ("pool", [-1, 32, 16, 16]),
    ("fc3", [-1, 512]),
    ("fc4", [-1, 10]),
]

pytestmark = pytest.mark.skipif(not MODEL_PATH.is_file(), reason="bundled model models/cifar10/1/model.onnx missing")


@pytest.fixture(scope="module")
def server():
    """This module's own server (its last test drains it), on ephemeral ports."""
    s = ServerProcess("--drain-seconds", "3", "--shutdown-timeout-seconds", "2")
    s.hostport = f"127.0.0.1:{s.http_port}"  # for tritonclient, which takes no scheme
    yield s
    assert s.stop() == 0, s.log


@pytest.fixture(scope="module")
def reference():
    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = session.run(["logits"], {"input": x})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return logits, e / e.sum(axis=1, keepdims=True)

    run.labels = labels
    return run


@pytest.fixture(scope="module")
def http(server):
    client = thttp.InferenceServerClient(server.hostport)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server):
    client = tgrpc.InferenceServerClient(server.grpc_target)
    yield client
    client.close()


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def http_input(x: np.ndarray, binary: bool = True, module=thttp):
    i = module.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def grpc_input(x: np.ndarray, module=tgrpc):
    i = module.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def check_classification(strings: np.ndarray, probs: np.ndarray, labels: list[str], k: int) -> None:
    assert strings.shape == (len(probs), k)
    for row, p in zip(strings, probs):
        parsed = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]
        values = [float(v) for v, _, _ in parsed]
        indices = [int(i) for _, i, _ in parsed]
        assert indices == list(np.argsort(-p, kind="stable")[:k])
        assert values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, p[indices], atol=1e-5)
        assert [label for _, _, label in parsed] == [labels[i] for i in indices]


def model_stats(http_client) -> dict:
    return http_client.get_inference_statistics(MODEL)["model_stats"][0]


def metric_samples(server, name: str) -> list:
    """(labels, value) of every sample called ``name`` on /metrics."""
    text = httpx.get(f"{server.http}/metrics").text
    return [
        (s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples if s.name == name
    ]


# ---- health, metadata, configuration ----------------------------------------------------------
def test_http_health_metadata_config(server, http):
    assert http.is_server_live() and http.is_server_ready()
    assert http.is_model_ready(MODEL) and http.is_model_ready(MODEL, "1")
    assert not http.is_model_ready("nope")
    meta = http.get_server_metadata()
    assert meta["name"] == "cnnserve"
    assert {"classification", "binary_tensor_data", "model_configuration", "statistics"} <= set(meta["extensions"])
    model = http.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert model["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]  # the layers are in the configuration only: tools request every output the metadata lists
    assert http.get_model_metadata(MODEL, "1")["versions"] == ["1"]
    config = http.get_model_config(MODEL)
    assert config["name"] == MODEL and config["max_batch_size"] > 0
    assert config["input"][0]["dims"] == [3, 32, 32] and config["input"][0]["data_type"] == "TYPE_FP32"
    assert [o["dims"] for o in config["output"]] == [[10], [10]]
    layers = json.loads(config["parameters"]["layer_outputs"]["string_value"])["outputs"]
    assert [(o["name"], o["shape"]) for o in layers] == LAYER_OUTPUTS
    assert "max_queue_delay_microseconds" in config["dynamic_batching"]
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    preprocessing = json.loads(config["parameters"]["preprocessing"]["string_value"])
    assert len(preprocessing["mean"]) == len(preprocessing["std"]) == 3
    with pytest.raises(InferenceServerException) as e:
        http.get_model_metadata(MODEL, "7")
    assert e.value.status() == "404"
    with httpx.Client(base_url=server.http) as raw:
        assert raw.get("/v2/models/nope/ready").status_code == 404
        assert raw.post("/v2/repository/index").json() == [
            {"name": MODEL, "version": "1", "state": "READY", "reason": ""}
        ]


def test_grpc_health_metadata_config(grpc_client):
    g = grpc_client
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(MODEL)
    meta = g.get_server_metadata()
    assert meta.name == "cnnserve" and "classification" in meta.extensions
    model = g.get_model_metadata(MODEL)
    assert model.platform == "onnxruntime_onnx" and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 3, 32, 32])]
    assert [(t.name, list(t.shape)) for t in model.outputs] == [
        ("logits", [-1, 10]),
        ("probabilities", [-1, 10]),
    ]
    config = g.get_model_config(MODEL).config
    assert config.max_batch_size > 0 and config.platform == "onnxruntime_onnx"
    assert list(config.input[0].dims) == [3, 32, 32]
    assert [list(o.dims) for o in config.output] == [[10], [10]]
    assert config.input[0].data_type == config.output[0].data_type == 11  # TYPE_FP32
    assert config.HasField("dynamic_batching")
    with pytest.raises(InferenceServerException) as e:
        g.get_model_metadata("nope")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as e:
        g.get_cuda_shared_memory_status()
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"


# ---- inference ---------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_infer_matches_onnxruntime(http, reference, binary):
    x = images(5, seed=1)
    logits, probs = reference(x)
    outputs = [
        thttp.InferRequestedOutput("logits", binary_data=binary),
        thttp.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = http.infer(MODEL, [http_input(x, binary)], outputs=outputs, request_id="req-42")
    response = result.get_response()
    assert response["id"] == "req-42" and response["model_version"] == "1"
    assert ("data" in response["outputs"][0]) is not binary
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-5)
    # No outputs requested: both, in binary (tritonclient sets binary_data_output).
    result = http.infer(MODEL, [http_input(x, binary)], model_version="1")
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits", "probabilities"]
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)


def test_large_requests_split_across_batches(http, grpc_client, reference):
    """More images than max_batch_size (64): one request, several batches, one answer in order;
    the HTTP body arrives in many chunks."""
    x = images(200, seed=11)
    logits, probs = reference(x)
    result = http.infer(MODEL, [http_input(x)], outputs=[thttp.InferRequestedOutput("probabilities")])
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-5)
    result = grpc_client.infer(MODEL, [grpc_input(x)], outputs=[tgrpc.InferRequestedOutput("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)


def test_http_json_nested_data_and_compression(server, reference):
    x = images(2, seed=2)
    logits, probs = reference(x)
    body = {
        "id": "nested",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 3, 32, 32], "data": x.tolist()}],
    }
    r = httpx.post(f"{server.http}/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["id"] == "nested" and [o["name"] for o in doc["outputs"]] == ["logits", "probabilities"]
    np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(2, 10), logits, atol=1e-5)
    np.testing.assert_allclose(np.array(doc["outputs"][1]["data"]).reshape(2, 10), probs, atol=1e-5)
    client = thttp.InferenceServerClient(server.hostport)
    try:
        result = client.infer(
            MODEL, [http_input(x)], request_compression_algorithm="gzip", outputs=[thttp.InferRequestedOutput("logits")]
        )
        np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    finally:
        client.close()


def test_grpc_infer_raw_and_typed_contents(server, grpc_client, reference):
    x = images(3, seed=3)
    logits, probs = reference(x)
    result = grpc_client.infer(
        MODEL,
        [grpc_input(x)],
        request_id="g-1",
        outputs=[tgrpc.InferRequestedOutput("probabilities"), tgrpc.InferRequestedOutput("logits")],
    )
    response = result.get_response()
    assert response.id == "g-1" and len(response.raw_output_contents) == 2
    np.testing.assert_allclose(result.as_numpy("logits"), logits, atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-5)
    # Typed contents (tritonclient always sends raw_input_contents; other clients may not).
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    t = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert [o.name for o in response.outputs] == ["logits", "probabilities"]
    np.testing.assert_allclose(
        np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 10), logits, atol=1e-5
    )


def test_grpc_streaming_answers_each_request_by_id_and_errors_keep_the_stream(server, grpc_client, reference):
    """tritonclient's start_stream / async_stream_infer (perf_analyzer --streaming): 150 requests
    on one call (more than a stream may have in progress, so it is also held back and resumed),
    each answered once with its id and the model's outputs; a request that fails is answered
    with its error and the stream goes on; a message that is not a ModelInferRequest too."""
    import queue

    x = images(150, seed=5)
    logits, _ = reference(x)
    answers: queue.Queue = queue.Queue()
    before = sum(
        v for labels, v in metric_samples(server, "cnnserve_requests_total") if labels["method"] == "ModelStreamInfer"
    )
    grpc_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(150):
            grpc_client.async_stream_infer(MODEL, [grpc_input(x[i : i + 1])], request_id=f"s-{i}")
        grpc_client.async_stream_infer(MODEL, [grpc_input(x[:1, :, :16, :16].copy())], request_id="bad-shape")
        grpc_client.async_stream_infer("nope", [grpc_input(x[:1])], request_id="no-model")
        got = [answers.get(timeout=60) for _ in range(152)]
    finally:
        grpc_client.stop_stream()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = sorted(str(e) for r, e in got if e is not None)
    assert sorted(results) == sorted(f"s-{i}" for i in range(150))
    for i in range(150):
        np.testing.assert_allclose(results[f"s-{i}"].as_numpy("logits"), logits[i : i + 1], atol=1e-5)
    assert len(errors) == 2 and "expects FP32 [-1,3,32,32]" in errors[0] and "unknown model 'nope'" in errors[1], errors
    after = sum(
        v for labels, v in metric_samples(server, "cnnserve_requests_total") if labels["method"] == "ModelStreamInfer"
    )
    assert after - before == 152

    # Bytes that are not a ModelInferRequest, between two good ones, on a raw stream.
    good = service_pb2.ModelInferRequest(model_name=MODEL, id="raw-good")
    good.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    good.raw_input_contents.append(x[0].tobytes())
    with grpc.insecure_channel(server.grpc_target) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        replies = list(stream(iter([good.SerializeToString(), b"\xff\xff\xff", good.SerializeToString()]), timeout=30))
    assert len(replies) == 3
    assert sorted(r.error_message.startswith("request is not a valid message") for r in replies) == [False, False, True]
    assert [r.infer_response.id for r in replies if not r.error_message] == ["raw-good", "raw-good"]


def test_a_stream_the_client_cancels_mid_flight_leaves_nothing_behind(server, reference):
    """200 requests sent on a stream, then the call cancelled with most of them in progress: no
    error logged (no task exception left unretrieved), the model's queue back to empty, and the
    next stream served."""
    x = images(1, seed=6)
    mark = len(server.lines)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        request.raw_input_contents.append(x.tobytes())
        call = stub.ModelStreamInfer(iter([request] * 200), timeout=30)
        next(call)  # the first answer: the stream is being served
        call.cancel()
        assert wait_for_idle(server)
        answers = list(stub.ModelStreamInfer(iter([request] * 3), timeout=30))
    assert [a.error_message for a in answers] == ["", "", ""]
    np.testing.assert_allclose(
        np.frombuffer(answers[0].infer_response.raw_output_contents[0], np.float32).reshape(1, 10),
        reference(x)[0],
        atol=1e-5,
    )
    time.sleep(0.3)  # the server's last lines reach the reader thread
    logged = [
        line for line in server.lines[mark:] if "ERROR" in line or "Traceback" in line or "never retrieved" in line
    ]
    assert not logged, logged[:4]


def wait_for_idle(server, timeout: float = 10) -> bool:
    """Whether the model's queue (cnnserve_queue_depth: images queued) comes back to empty."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(v for _, v in metric_samples(server, "cnnserve_queue_depth")) == 0:
            return True
        time.sleep(0.05)
    return False


def test_classification_top3(http, grpc_client, reference):
    x = images(4, seed=4)
    _, probs = reference(x)
    for binary in (True, False):
        result = http.infer(
            MODEL,
            [http_input(x)],
            outputs=[
                thttp.InferRequestedOutput("probabilities", binary_data=binary, class_count=3),
                thttp.InferRequestedOutput("logits", binary_data=binary),
            ],
        )
        assert result.get_output("probabilities")["datatype"] == "BYTES"
        check_classification(result.as_numpy("probabilities"), probs, reference.labels, 3)
    result = grpc_client.infer(MODEL, [grpc_input(x)], outputs=[tgrpc.InferRequestedOutput("logits", class_count=3)])
    check_classification(result.as_numpy("logits"), probs, reference.labels, 3)
    # More classes than the model has: capped, as Triton does.
    result = http.infer(MODEL, [http_input(x)], outputs=[thttp.InferRequestedOutput("probabilities", class_count=50)])
    check_classification(result.as_numpy("probabilities"), probs, reference.labels, 10)


def test_statistics_move(http, grpc_client):
    before = model_stats(http)
    http.infer(MODEL, [http_input(images(3))])
    grpc_client.infer(MODEL, [grpc_input(images(2))])
    after = model_stats(http)
    assert after["inference_count"] == before["inference_count"] + 5
    assert after["execution_count"] >= before["execution_count"] + 1
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] == old["success"]["count"] + 2
    assert stats["success"]["ns"] > old["success"]["ns"] and stats["compute_infer"]["ns"] > old["compute_infer"]["ns"]
    assert after["last_inference"] > 0 and after["batch_stats"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    g = grpc_client.get_inference_statistics(MODEL).model_stats[0]
    assert g.name == MODEL and g.inference_count == after["inference_count"]
    assert http.get_inference_statistics()["model_stats"][0]["name"] == MODEL  # /v2/models/stats


# ---- bad requests ------------------------------------------------------------------------------
def _http_error(call) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value.status()


def test_http_bad_requests(server, http, reference):
    x = images(1)
    assert _http_error(lambda: http.infer("nope", [http_input(x)])) == "404"
    assert _http_error(lambda: http.infer(MODEL, [http_input(x)], model_version="9")) == "404"
    bad_shape = images(1)[:, :, :, :31].copy()
    assert _http_error(lambda: http.infer(MODEL, [http_input(bad_shape)])) == "400"
    ints = thttp.InferInput("input", [1, 3, 32, 32], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.int32))
    assert _http_error(lambda: http.infer(MODEL, [ints])) == "400"
    assert (
        _http_error(lambda: http.infer(MODEL, [http_input(x)], outputs=[thttp.InferRequestedOutput("nope")])) == "400"
    )
    url = f"{server.http}/v2/models/{MODEL}/infer"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 3, 32, 32],
                    "parameters": {"binary_data_size": 3072 * 4},
                }
            ]
        }
    ).encode()
    short = header + x.tobytes()[:-4]
    for body, length in [
        (short, len(header)),  # binary size mismatch
        (header + x.tobytes() + b"\0" * 4, len(header)),  # extra bytes
        (header + x.tobytes(), len(header) + 10**6),  # header length past the body
        (b"{not json", None),
    ]:
        headers = {"Inference-Header-Content-Length": str(length)} if length is not None else {}
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]
    r = httpx.post(
        url, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [257, 3, 32, 32], "data": [0.0]}]}
    )
    assert r.status_code == 413  # more than --max-images-per-request, refused before decoding
    r = httpx.post(
        url,
        json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [[1.0, 2.0], [3.0]]}]},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(
        url, json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ["1.0"] * 3072}]}
    )
    assert r.status_code == 400
    r = httpx.post(
        url,
        json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": x.ravel().tolist()}],
            "parameters": {"binary_data_output": "yes"},
        },
    )
    assert r.status_code == 400 and "binary_data_output" in r.json()["error"]
    # Still serving, and answering correctly.
    logits, _ = reference(x)
    np.testing.assert_allclose(http.infer(MODEL, [http_input(x)]).as_numpy("logits"), logits, atol=1e-5)


def test_http_infer_paths_direct_and_routed(server, reference):
    """POST to an infer path is served ahead of FastAPI's routing (routes.DirectRoute); the same
    answers as FastAPI's routes would give: a version in the path, other methods 405, paths that
    are not an infer route 404."""
    x = images(1)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": x.ravel().tolist()}]}
    r = httpx.post(f"{server.http}/v2/models/{MODEL}/versions/1/infer", json=doc)
    assert r.status_code == 200, r.text
    logits, _ = reference(x)
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    np.testing.assert_allclose(np.array(outputs["logits"]["data"]).reshape(1, -1), logits, atol=1e-5)
    assert r.json()["model_version"] == "1"
    assert httpx.get(f"{server.http}/v2/models/{MODEL}/infer").status_code == 405
    for path in ("/v2/models//infer", f"/v2/models/{MODEL}/versions//infer", f"/v2/models/{MODEL}/x/1/infer"):
        r = httpx.post(f"{server.http}{path}", json=doc)
        assert r.status_code == 404, (path, r.text)


def test_grpc_bad_requests(server, grpc_client, reference):
    x = images(1)

    def status(call) -> str:
        with pytest.raises(InferenceServerException) as e:
            call()
        return e.value.status()

    assert status(lambda: grpc_client.infer("nope", [grpc_input(x)])) == "StatusCode.NOT_FOUND"
    bad_shape = images(1)[:, :2].copy()
    assert status(lambda: grpc_client.infer(MODEL, [grpc_input(bad_shape)])) == "StatusCode.INVALID_ARGUMENT"
    ints = tgrpc.InferInput("input", [1, 3, 32, 32], "INT32")
    ints.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.int32))
    assert status(lambda: grpc_client.infer(MODEL, [ints])) == "StatusCode.INVALID_ARGUMENT"
    assert (
        status(lambda: grpc_client.infer(MODEL, [grpc_input(x)], outputs=[tgrpc.InferRequestedOutput("nope")]))
        == "StatusCode.INVALID_ARGUMENT"
    )
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
    request.raw_input_contents.append(x.tobytes()[:-8])  # size mismatch
    with grpc.insecure_channel(server.grpc_target) as channel, pytest.raises(grpc.RpcError) as e:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in e.value.details()
    logits, _ = reference(x)
    np.testing.assert_allclose(grpc_client.infer(MODEL, [grpc_input(x)]).as_numpy("logits"), logits, atol=1e-5)
    counts = {(l["protocol"], l["method"], l["code"]): v for l, v in metric_samples(server, "cnnserve_requests_total")}
    assert counts[("grpc", "ModelInfer", "INVALID_ARGUMENT")] >= 3
    assert counts[("grpc", "ModelInfer", "NOT_FOUND")] >= 1
    assert counts[("grpc", "ModelInfer", "OK")] >= 1
    assert counts[("http", "v2_infer", "400")] >= 5


# ---- asyncio clients and concurrency -----------------------------------------------------------
def test_aio_clients_concurrent(server, reference):
    per_protocol = 32
    xs = images(2 * per_protocol, seed=7)[:, None]  # 64 distinct single-image requests
    expected = [reference(x)[0] for x in xs]

    async def main():
        h = thttp_aio.InferenceServerClient(server.hostport)
        g = tgrpc_aio.InferenceServerClient(server.grpc_target)
        try:
            assert await h.is_server_live() and await h.is_server_ready() and await h.is_model_ready(MODEL)
            assert await g.is_server_live() and await g.is_server_ready() and await g.is_model_ready(MODEL)
            assert (await h.get_server_metadata())["name"] == (await g.get_server_metadata()).name == "cnnserve"
            assert (await h.get_model_metadata(MODEL))["platform"] == (await g.get_model_metadata(MODEL)).platform
            assert (
                (await h.get_model_config(MODEL))["max_batch_size"]
                == (await g.get_model_config(MODEL)).config.max_batch_size
                > 0
            )
            before = (await h.get_inference_statistics(MODEL))["model_stats"][0]

            async def via_http(i):
                result = await h.infer(MODEL, [http_input(xs[i], module=thttp_aio)], request_id=f"h{i}")
                return result.get_response()["id"], result.as_numpy("logits")

            async def via_grpc(i):
                result = await g.infer(MODEL, [grpc_input(xs[i], module=tgrpc_aio)], request_id=f"g{i}")
                return result.get_response().id, result.as_numpy("logits")

            answers = await asyncio.gather(
                *(via_http(i) for i in range(per_protocol)),
                *(via_grpc(i) for i in range(per_protocol, 2 * per_protocol)),
            )
            after = (await h.get_inference_statistics(MODEL))["model_stats"][0]
            grpc_stats = (await g.get_inference_statistics(MODEL)).model_stats[0]
            return answers, before, after, grpc_stats
        finally:
            await h.close()
            await g.close()

    answers, before, after, grpc_stats = asyncio.run(main())
    for i, (request_id, logits) in enumerate(answers):
        assert request_id == ("h" if i < per_protocol else "g") + str(i)
        np.testing.assert_allclose(logits, expected[i], atol=1e-5)
    n = 2 * per_protocol
    assert after["inference_count"] - before["inference_count"] == n
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == n
    executions = after["execution_count"] - before["execution_count"]
    assert executions < n, "concurrent requests were never batched together"
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1
    assert grpc_stats.execution_count == after["execution_count"]
    buckets = {
        float(l["le"]): v for l, v in metric_samples(server, "cnnserve_batch_size_bucket") if l["model"] == MODEL
    }
    assert buckets[1.0] < buckets[float("inf")], "no batch of more than one image in cnnserve_batch_size"


# ---- draining (last: it starts the module server's shutdown) -----------------------------------
def test_readiness_false_while_draining(server, http, grpc_client, reference):
    server.terminate()
    deadline = time.monotonic() + 10
    while http.is_server_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not http.is_server_ready() and http.is_server_live()
    assert httpx.get(f"{server.http}/v2/health/ready").status_code == 503
    assert not http.is_model_ready(MODEL)
    assert not grpc_client.is_server_ready() and not grpc_client.is_model_ready(MODEL)
    x = images(1, seed=9)  # new requests are still served while draining
    np.testing.assert_allclose(grpc_client.infer(MODEL, [grpc_input(x)]).as_numpy("logits"), reference(x)[0], atol=1e-5)
    assert not [line for line in server.lines if "Traceback" in line or " ERROR " in line], server.log
