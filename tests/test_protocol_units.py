"""Fast unit tests of the request parsers: no server process, the real model's runtime where a
parser needs one."""

from __future__ import annotations

import asyncio
import base64
import re

import numpy as np
import orjson
import pytest

from service.errors import InvalidInput, InvalidParameter, PayloadTooLarge, UnsupportedMediaType
from service.http_api.context import timeout_from_header
from service.http_api.inference_rest import decompress, encode_rest_response, parse_rest_request
from service.http_api.inference_routes import infer_path
from service.http_api.routes import int_parameter, parse_json_body
from service.inference.batcher import Batcher
from service.inference.core import InferenceCore
from service.inference.decoding import DecodePool
from service.inference.repository import scan
from service.inference.runtime import ModelRuntime
from service.inference.serving import LoadedModel
from service.metrics import Metrics, ModelStats
from service.protocol.open_inference import InferResponse, InputTensor, build_outputs, decode_input, plan_outputs
from service.settings import Settings
from tests.conftest import MODEL_PATH, MODEL_REPOSITORY

SHAPE = [2, 3, 32, 32]


@pytest.fixture(scope="module")
def runtime():
    spec = next(s for s in scan(MODEL_REPOSITORY) if s.path == MODEL_PATH)
    return ModelRuntime(spec, Settings(providers=["cpu"], intra_op_threads=1))


@pytest.fixture(scope="module")
def model(runtime):
    return LoadedModel(runtime, None, ModelStats())


def rest_body(doc: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    head = orjson.dumps(doc)
    return head + binary, (str(len(head)) if binary else None)


# ---- /predict -------------------------------------------------------------------------------------
def test_predict_json_body():
    images, top_k, model, version = parse_json_body(
        orjson.dumps({"images": [base64.b64encode(b"abc").decode()], "top_k": 3, "model": "m", "model_version": "2"})
    )
    assert (images, top_k, model, version) == ([b"abc"], 3, "m", "2")
    for body, message in (
        (b"{nope", "not valid JSON"),
        (b"[]", '"images"'),
        (orjson.dumps({"images": "abc"}), '"images"'),
        (orjson.dumps({"images": [1]}), "images[0] must be a base64 string"),
        (orjson.dumps({"images": ["QUJD", "@@"]}), "images[1] is not valid base64"),
    ):
        with pytest.raises(InvalidInput, match=re.escape(message)):
            parse_json_body(body)


def test_query_integers_and_the_timeout_header():
    assert int_parameter("top_k", "3") == 3 and int_parameter("top_k", None) is None and int_parameter("k", "") is None
    for raw in ("three", "\u0665", "1_0", " 3 ", "\u00b2"):  # only ASCII digits are numbers
        with pytest.raises(InvalidParameter, match="top_k must be a non-negative integer in ASCII digits"):
            int_parameter("top_k", raw)
    assert timeout_from_header(None) is None
    assert timeout_from_header("250") == 0.25 and timeout_from_header("0.5") == 0.0005
    for raw in ("0", "-5", "soon", "inf", "nan", "", "1e3", "\u00b2"):
        with pytest.raises(InvalidParameter, match="x-request-timeout-ms"):
            timeout_from_header(raw)


# ---- v2 REST bodies -------------------------------------------------------------------------------
def test_rest_request_json_and_binary_inputs():
    x = np.arange(np.prod(SHAPE), dtype=np.float32)
    body, length = rest_body(
        {
            "id": "r1",
            "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": SHAPE, "parameters": {"binary_data_size": x.nbytes}}
            ],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
        },
        x.tobytes(),
    )
    request = parse_rest_request("cifar10", "1", body, length)
    assert (request.model, request.version, request.id) == ("cifar10", "1", "r1")
    assert request.parameters == {"binary_data_output": True}
    assert bytes(request.inputs[0].raw) == x.tobytes() and request.inputs[0].data is None
    assert request.outputs == [("probabilities", {"classification": 3})]
    body, length = rest_body({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [[1, 2]]}]})
    assert parse_rest_request("m", "", body, length).inputs[0].data.tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "doc,binary,header,message",
    [
        (None, b"", None, "not valid JSON"),
        ([], b"", None, "must be a JSON object"),
        ({"inputs": []}, b"", None, "non-empty list"),
        ({"inputs": [3]}, b"", None, r"inputs\[0\] must be a JSON object"),
        ({"inputs": [{"name": "input"}]}, b"", None, '"name" and "datatype" strings'),
        ({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "parameters": 3}]}, b"", None, "parameters"),
        (
            {"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 8}}]},
            b"1234",
            "auto",
            "exceeds the 4 bytes",
        ),
        (
            {"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}]},
            b"xx",
            "auto",
            "2 bytes of binary",
        ),
        ({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}]}, b"", "999", "not a size within"),
        (
            {"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": "all"},
            b"",
            None,
            "list",
        ),
        ({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1]}], "id": 7}, b"", None, '"id"'),
    ],
)
def test_rest_request_errors(doc, binary, header, message):
    head = b"{not json" if doc is None else orjson.dumps(doc)
    if header == "auto":
        header = str(len(head))
    with pytest.raises(InvalidInput, match=message):
        parse_rest_request("m", "", head + binary, header)


def test_decompression_is_bounded():
    import gzip
    import zlib

    assert decompress(gzip.compress(b"x" * 100), "gzip", 1000) == b"x" * 100
    assert decompress(zlib.compress(b"y" * 10), "deflate", 1000) == b"y" * 10
    assert decompress(b"raw", None, 10) == b"raw"
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(b"x" * 5000), "gzip", 1000)
    with pytest.raises(InvalidInput, match="not valid gzip"):
        decompress(b"not gzip", "gzip", 1000)
    with pytest.raises(UnsupportedMediaType, match="br"):
        decompress(b"", "br", 1000)


# ---- the protocol's input and outputs -------------------------------------------------------------
def test_decode_input_accepts_raw_json_and_typed_contents(model):
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for tensor in (
        InputTensor("input", "FP32", SHAPE, raw=x.astype("<f4").tobytes()),
        InputTensor("input", "FP32", SHAPE, data=x.tolist()),
        InputTensor("input", "FP32", SHAPE, data=x.ravel().tolist()),
        InputTensor("input", "FP32", SHAPE, data=list(x.ravel()), contents="fp32_contents"),
    ):
        out = decode_input(model, [tensor])
        assert out.dtype == np.float32 and out.shape == tuple(SHAPE)
        np.testing.assert_array_equal(out, x)
    unaligned = memoryview(b"\0" + x.tobytes())[1:]
    np.testing.assert_array_equal(decode_input(model, [InputTensor("input", "FP32", SHAPE, raw=unaligned)]), x)


@pytest.mark.parametrize(
    "inputs,error,message",
    [
        ([], InvalidInput, "exactly one input 'input'"),
        ([InputTensor("pixels", "FP32", SHAPE, data=[0])], InvalidInput, "unexpected input 'pixels'"),
        ([InputTensor("input", "INT8", SHAPE, data=[0])], InvalidInput, "datatype 'INT8'"),
        ([InputTensor("input", "FP32", [1, 3, 28, 28], data=[0])], InvalidInput, r"FP32 \[-1,3,32,32\]"),
        ([InputTensor("input", "FP32", [1.5, 3, 32, 32], data=[0])], InvalidInput, "shape"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32], raw=b"\0" * 12)], InvalidInput, "12 bytes but"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32], data=[0.0] * 5)], InvalidInput, "holds 5 values"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32], data=["a"] * 3072)], InvalidInput, "numbers only"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32], data=[[1], [1, 2]])], InvalidInput, "regular array"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32], data=[1], contents="int_contents")], InvalidInput, "fp32"),
        ([InputTensor("input", "FP32", [1, 3, 32, 32])], InvalidInput, "has no data"),
    ],
)
def test_decode_input_errors(model, inputs, error, message):
    with pytest.raises(error, match=message):
        decode_input(model, inputs)


@pytest.mark.parametrize(
    "count,error,message",
    [(0, InvalidInput, "holds no image"), (9, PayloadTooLarge, "limit is 8"), (33, PayloadTooLarge, "limit is 8")],
)
def test_infer_checks_the_count_before_the_tensor_is_built(runtime, count, error, message):
    """The core refuses a v2 request by its image count alone: its tensor is never built."""
    settings = Settings(providers=["cpu"], intra_op_threads=1, max_images_per_request=8, max_queue_size=32)
    metrics = Metrics()
    core = InferenceCore(settings, metrics, DecodePool(settings, metrics))
    built: list[int] = []

    def tensor(n: int):
        def build() -> np.ndarray:
            built.append(n)
            return np.zeros((n, 3, 32, 32), np.float32)

        return build

    def queue(index: int, model: object, stats: object) -> Batcher:
        batcher = Batcher(runtime.run_batch, max_queue_size=32)
        batcher.start()
        return batcher

    async def run() -> None:
        core.start([runtime], queue)
        try:
            with pytest.raises(error, match=message):
                await core.infer(core.model(), count, tensor(count))
            out = await core.infer(core.model(), 2, tensor(2))  # a valid one is built once, and runs
            assert out.probabilities.shape == (2, 10)
        finally:
            await core.close()

    asyncio.run(run())
    assert built == [2]


def test_plan_outputs(model):
    default = plan_outputs(model, [], binary_default=True)
    assert [(p.name, p.classification, p.binary) for p in default] == [("logits", 0, True), ("probabilities", 0, True)]
    plan = plan_outputs(model, [("probabilities", {"classification": 99, "binary_data": False})], binary_default=True)
    assert [(p.name, p.classification, p.binary) for p in plan] == [("probabilities", 10, False)]
    for requested, message in (
        ([("scores", {})], "unknown output 'scores'"),
        ([("logits", {}), ("logits", {})], "requested twice"),
        ([("logits", {"classification": -1})], "positive number"),
        ([("logits", {"classification": "3"})], "must be an integer"),
        ([("logits", {"binary_data": 1})], "must be a boolean"),
    ):
        with pytest.raises(InvalidInput, match=message):
            plan_outputs(model, requested, binary_default=False)


def test_non_finite_inputs_pass_by_default_and_are_refused_on_request(model):
    x = np.zeros(SHAPE, np.float32)
    x[0, 1, 2, 3], x[1, 0, 0, 0] = np.nan, -np.inf
    tensor = InputTensor("input", "FP32", SHAPE, raw=x.astype("<f4").tobytes())
    np.testing.assert_array_equal(decode_input(model, [tensor]), x)  # as Triton: passed to the model
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        decode_input(model, [tensor], refuse_non_finite=True)
    # A finite JSON number beyond FP32's range becomes Inf: refused with the others.
    big = InputTensor("input", "FP32", [1, 3, 32, 32], data=[1e39] + [0.0] * 3071)
    with pytest.raises(InvalidInput, match="beyond FP32's range"):
        decode_input(model, [big], refuse_non_finite=True)


def test_nan_answers_stay_valid_json_and_leave_other_images_alone(model):
    """The FP32 model answers NaN to a NaN input (INT8's quantizer maps it to a number): JSON
    writes it as null, the binary section and gRPC carry the IEEE value, and the image beside it
    in the batch gets the answer it gets alone."""
    spec = next(s for s in scan(MODEL_REPOSITORY) if s.path == MODEL_PATH)
    fp32 = LoadedModel(
        ModelRuntime(spec, Settings(providers=["cpu"], intra_op_threads=1, precision="fp32")), None, ModelStats()
    )
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    alone = fp32.runtime.run_batch([x[1:].copy()])
    x[0, 2, 5, 5] = np.nan
    result = fp32.runtime.run_batch([x])
    plan = plan_outputs(fp32, [("probabilities", {}), ("logits", {"classification": 3})], False)
    body, header_length = encode_rest_response(InferResponse("cifar10", "1", "r", build_outputs(fp32, plan, result)))
    assert header_length is None
    doc = orjson.loads(body)  # orjson, like browsers, refuses the bare NaN token some encoders write
    probabilities = doc["outputs"][0]["data"]
    assert probabilities[:10] == [None] * 10
    np.testing.assert_allclose(probabilities[10:], alone.probabilities[0], rtol=1e-6)
    assert doc["outputs"][1]["data"][0].startswith("nan:")
    assert doc["outputs"][1]["data"][3].split(":")[1] == str(int(alone.order[0, 0]))


def test_top_k_is_capped_at_the_models_classes_whether_given_or_default():
    settings, metrics = Settings(providers=["cpu"], intra_op_threads=1), Metrics()
    core = InferenceCore(settings, metrics, DecodePool(settings, metrics))
    assert core.top_k(None, num_classes=4) == 4  # the default, 5
    assert core.top_k(8, num_classes=4) == 4
    assert core.top_k(3, num_classes=4) == 3
    for bad in (0, 11, True, "3"):
        with pytest.raises(InvalidParameter, match="from 1 to 10"):
            core.top_k(bad, num_classes=4)


def test_rest_response_binary_section(model):
    result = model.runtime.run_batch([np.zeros((2, 32, 32, 3), np.uint8)])
    plan = plan_outputs(model, [("probabilities", {"binary_data": True}), ("logits", {"classification": 2})], False)
    body, header_length = encode_rest_response(InferResponse("cifar10", "1", "r", build_outputs(model, plan, result)))
    head = orjson.loads(body[:header_length])
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    probabilities = np.frombuffer(body[header_length:], "<f4").reshape(2, 10)
    np.testing.assert_allclose(probabilities, result.probabilities)
    assert len(head["outputs"][1]["data"]) == 4 and head["outputs"][1]["data"][0].count(":") == 2


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/models/cifar10/infer", ("cifar10", None)),
        ("/v2/models/cifar10/versions/2/infer", ("cifar10", "2")),
        ("/v2/models/infer", None),  # no name segment
        ("/v2/models//infer", None),
        ("/v2/models/cifar10/versions//infer", None),
        ("/v2/models/cifar10/x/2/infer", None),
        ("/v2/models/a/b/c/d/infer", None),
        ("/v2/models/cifar10/ready", None),
        ("/v2/models/cifar10/inference", None),
    ],
)
def test_infer_path_matches_as_the_router(path, expected):
    """What routes.DirectRoute takes for v2 inference: exactly the paths of the two infer routes."""
    assert infer_path(path) == expected
