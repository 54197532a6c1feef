"""Property-based tests: schemathesis fuzzes the HTTP API from its own /openapi.json against a real
server, and Hypothesis the parsers of what clients send (the /predict JSON body, multipart bodies,
the Open Inference Protocol REST body, request compression, header numbers, image bytes).
Properties: no 5xx, no crash, every error is JSON ``{"error": "..."}``; parsers either return or
raise a domain error. Bounded in examples so that the whole file runs in about a minute."""

from __future__ import annotations

import base64
import gzip
import re
import zlib

import httpx
import numpy as np
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from service.ascii_numbers import parse_decimal, parse_uint
from service.errors import InvalidInput, InvalidParameter, ServiceError
from service.http_api.inference_rest import decompress, parse_rest_request
from service.http_api.routes import parse_json_body
from service.inference import codec
from tests.conftest import distinct_images, png_bytes


def fuzz(examples: int) -> settings:
    """Hypothesis settings of a bounded, reproducible-enough CI run: ``examples`` cases, no
    per-example deadline (the server is shared with other tests), no example database."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)


# ---- schemathesis: the whole HTTP API from its OpenAPI description ------------------------------
# (schemathesis' pytest plugin does not run under pytest 9 — it sets Function._nodeid — so the
# operations' strategies are driven with Hypothesis directly.)
API_EXAMPLES = 15  # per operation and mode: ~20 operations x 2 modes x 15 = ~600 requests


def no_server_error(ctx, response, case) -> bool | None:
    """No 5xx, except the documented 504 of a request whose own X-Request-Timeout-Ms passed."""
    own_deadline = any(k.lower() == "x-request-timeout-ms" for k in (case.headers or {}))
    if response.status_code == 504 and own_deadline:
        return None
    assert response.status_code < 500, (response.status_code, response.content[:200])
    return None


def errors_are_json(ctx, response, case) -> bool | None:
    """Every 4xx/5xx answer is ``{"error": "<non-empty string>"}`` with a JSON content type."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    doc = orjson.loads(response.content)
    assert isinstance(doc, dict) and isinstance(doc.get("error"), str) and doc["error"], doc
    return None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_http_api_never_answers_5xx_and_errors_are_json(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.http}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert any(op.path == "/predict" for op in operations) and len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @fuzz(API_EXAMPLES)
        def call(case):
            case.call_and_validate(base_url=server.http, checks=[no_server_error, errors_are_json], timeout=30)

        try:
            call()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE  # an operation without inputs has no invalid ones
    assert server.proc.poll() is None


# ---- numbers ------------------------------------------------------------------------------------------
ASCII_UINT = re.compile(r"[0-9]{1,18}")
ASCII_DECIMAL = re.compile(r"[0-9]{1,15}(\.[0-9]{1,15})?")


@given(st.one_of(st.text(max_size=30), st.from_regex(ASCII_UINT, fullmatch=True)))
@fuzz(500)
def test_parse_uint_takes_ascii_digits_only(text):
    if ASCII_UINT.fullmatch(text):
        assert parse_uint(text, "n") == int(text)
    else:
        with pytest.raises(InvalidInput):
            parse_uint(text, "n")


@given(st.one_of(st.text(max_size=30), st.from_regex(ASCII_DECIMAL, fullmatch=True)))
@fuzz(500)
def test_parse_decimal_takes_ascii_decimals_only(text):
    if ASCII_DECIMAL.fullmatch(text):
        assert parse_decimal(text, "x", InvalidParameter) == float(text)
    else:
        with pytest.raises(InvalidParameter):
            parse_decimal(text, "x", InvalidParameter)


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF), min_size=1, max_size=12))
@fuzz(40)
def test_header_numbers_through_the_server(server, text):
    image = SMALL_PNG
    headers = [(b"Content-Type", b"image/png"), (b"X-Request-Timeout-Ms", text.encode("latin-1"))]
    r = httpx.post(f"{server.http}/predict", content=image, headers=headers, timeout=30)
    valid = ASCII_DECIMAL.fullmatch(text) is not None and float(text) > 0
    if valid:
        assert r.status_code in (200, 504), r.text  # a tiny deadline may pass: 504, never 5xx otherwise
    else:  # DEL is not allowed in a header value at all: the HTTP parser answers 400 first
        assert r.status_code == (400 if "\x7f" in text else 422) and r.json()["error"], r.text
    r = httpx.post(
        f"{server.http}/v2/models/cifar10/infer",
        content=b'{"inputs":[]}',
        headers=[(b"Inference-Header-Content-Length", text.encode("latin-1"))],
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]


SMALL_PNG = png_bytes(distinct_images(1, seed=40)[0])
SMALL_B64 = base64.b64encode(SMALL_PNG).decode()

# ---- /predict JSON body -----------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
PREDICT_DOCS = st.fixed_dictionaries(
    {},
    optional={
        "images": st.lists(st.sampled_from([SMALL_B64, "@@", "", "aGVsbG8="]) | JSON_VALUES, max_size=4),
        "top_k": JSON_VALUES,
        "model": JSON_VALUES,
        "model_version": JSON_VALUES,
    },
)


@given(st.one_of(st.binary(max_size=200), PREDICT_DOCS.map(orjson.dumps), JSON_VALUES.map(orjson.dumps)))
@fuzz(300)
def test_the_predict_json_parser_returns_or_refuses(body):
    try:
        images, *_ = parse_json_body(body)
    except ServiceError:
        return
    assert all(isinstance(i, bytes) for i in images)


@given(PREDICT_DOCS)
@fuzz(30)
def test_predict_json_bodies_through_the_server(server, doc):
    r = httpx.post(f"{server.http}/predict", content=orjson.dumps(doc), headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json()["error"]


# ---- multipart ------------------------------------------------------------------------------------------
PART_NAMES = st.sampled_from(["file", "other", "", 'fi"le', "file\r\n"])
PART_BODIES = st.sampled_from([SMALL_PNG, b"", b"junk", b"--x\r\n"]) | st.binary(max_size=64)


@st.composite
def multipart_bodies(draw):
    boundary = draw(st.sampled_from([b"fuzzboundary", b"x", b"a" * 70]))
    parts = []
    for name, body in draw(st.lists(st.tuples(PART_NAMES, PART_BODIES), max_size=4)):
        disposition = b'Content-Disposition: form-data; name="' + name.encode() + b'"'
        if draw(st.booleans()):
            disposition += b'; filename="f.png"'
        parts.append(b"--" + boundary + b"\r\n" + disposition + b"\r\nContent-Type: image/png\r\n\r\n" + body + b"\r\n")
    ending = draw(st.sampled_from([b"--" + boundary + b"--\r\n", b"", b"--" + boundary + b"\r\n", b"garbage"]))
    header_boundary = draw(st.sampled_from([boundary, boundary, b"", b"other"]))
    return b"".join(parts) + ending, b"multipart/form-data; boundary=" + header_boundary


@given(multipart_bodies())
@fuzz(40)
def test_multipart_bodies_through_the_server(server, body_and_type):
    body, content_type = body_and_type
    r = httpx.post(f"{server.http}/predict", content=body, headers=[(b"Content-Type", content_type)], timeout=30)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.headers["content-type"] == "application/json" and r.json()["error"]


# ---- Open Inference Protocol REST body -----------------------------------------------------------------
def _v2_doc(draw_inputs):
    return st.fixed_dictionaries(
        {"inputs": draw_inputs},
        optional={
            "id": JSON_VALUES,
            "parameters": JSON_VALUES,
            "outputs": st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["logits", "probabilities", "x"])}, optional={"parameters": JSON_VALUES}
                ),
                max_size=3,
            )
            | JSON_VALUES,
        },
    )


V2_INPUTS = st.lists(
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["input", "x"]) | JSON_VALUES,
            "datatype": st.sampled_from(["FP32", "INT8", "BYTES"]) | JSON_VALUES,
            "shape": st.lists(st.integers(-2, 4), max_size=5) | JSON_VALUES,
        },
        optional={
            "data": st.lists(st.floats(width=32) | st.integers(-(2**63), 2**63 - 1) | JSON_VALUES, max_size=8)
            | JSON_VALUES,
            "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-4, 64) | JSON_VALUES}),
        },
    ),
    max_size=3,
)


@given(
    _v2_doc(V2_INPUTS | JSON_VALUES).map(orjson.dumps) | st.binary(max_size=200),
    st.binary(max_size=64),
    st.none() | st.text(max_size=6) | st.just("json"),
)
@fuzz(400)
def test_the_v2_rest_parser_returns_or_refuses(head, binary, header_length):
    body = head + binary
    if header_length == "json":
        header_length = str(len(head))
    try:
        request = parse_rest_request("cifar10", "", body, header_length)
    except ServiceError:
        return
    assert request.model == "cifar10" and isinstance(request.inputs, list)


@given(_v2_doc(V2_INPUTS).map(orjson.dumps))
@fuzz(30)
def test_v2_bodies_through_the_server(server, body):
    r = httpx.post(f"{server.http}/v2/models/cifar10/infer", content=body, timeout=30)
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert r.json()["error"]


@given(st.lists(st.binary(max_size=100), min_size=1, max_size=4), st.binary(max_size=20))
@fuzz(200)
def test_decompress_inflates_every_gzip_member_and_refuses_the_rest(pieces, junk):
    body = b"".join(gzip.compress(p) for p in pieces)
    assert decompress(body, "gzip", 1 << 20) == b"".join(pieces)
    assert decompress(zlib.compress(pieces[0]), "deflate", 1 << 20) == pieces[0]
    for encoding in ("gzip", "deflate"):
        try:
            out = decompress(body + junk if encoding == "gzip" else junk, encoding, 1 << 20)
        except ServiceError:
            continue
        assert isinstance(out, bytes)
    with pytest.raises(ServiceError):
        decompress(body, "gzip", max(0, len(b"".join(pieces)) - 1)) if any(pieces) else decompress(body, "br", 1 << 20)


# ---- image bytes ----------------------------------------------------------------------------------------
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: codec.PNG_MAGIC + b),
        st.binary(max_size=300).map(lambda b: codec.JPEG_MAGIC + b),
        st.tuples(st.integers(0, len(SMALL_PNG)), st.binary(max_size=8)).map(
            lambda t: SMALL_PNG[: t[0]] + t[1] + SMALL_PNG[t[0] + len(t[1]) :]
        ),
    )
)
@fuzz(300)
def test_image_decoding_returns_pixels_or_refuses(data):
    try:
        pixels = codec.decode_image(data, 1 << 20, budget=codec.PixelBudget(1 << 22))
    except ServiceError:
        return
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
