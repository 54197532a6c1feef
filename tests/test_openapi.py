"""/openapi.json documents real bodies and our {"error": ...}; /docs works without internet."""

from __future__ import annotations

import re

import httpx
import pytest

from service.http_api.schemas import ErrorBody, PredictResponse, Readiness
from tests.conftest import distinct_images, png_bytes

ERROR_REF = "#/components/schemas/ErrorBody"


@pytest.fixture(scope="module")
def spec(server):
    return httpx.get(f"{server.http}/openapi.json").json()


def test_predict_documents_every_body_kind_and_its_answers(spec):
    post = spec["paths"]["/predict"]["post"]
    content = post["requestBody"]["content"]
    assert {"image/jpeg", "image/png", "multipart/form-data", "application/json"} <= set(content)
    assert content["image/jpeg"]["schema"]["format"] == "binary"
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["items"]["format"] == "binary"
    assert content["application/json"]["schema"]["properties"]["images"]["type"] == "array"
    ok = post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok == "#/components/schemas/PredictResponse"
    for code in ("400", "413", "415", "422", "429", "503", "504"):
        assert post["responses"][code]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF


def test_v2_routes_document_our_errors_not_fastapis(spec):
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    v2 = [(path, op) for path, ops in spec["paths"].items() if path.startswith("/v2") for op in ops.values()]
    assert len(v2) >= 10
    for path, op in v2:
        assert "422" not in op["responses"], path
        assert op["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"] == ERROR_REF, path
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert infer["application/json"]["schema"]["required"] == ["inputs"]


def test_real_answers_fit_the_documented_schemas(server):
    r = httpx.post(
        f"{server.http}/predict?top_k=2",
        content=png_bytes(distinct_images(1)[0]),
        headers={"Content-Type": "image/png"},
    )
    assert len(PredictResponse.model_validate(r.json()).results[0].predictions) == 2
    for bad in (
        httpx.post(f"{server.http}/predict", content=b"x", headers={"Content-Type": "text/plain"}),
        httpx.post(f"{server.http}/v2/models/nope/infer", json={"inputs": []}),
        httpx.post(
            f"{server.http}/v2/models/cifar10/infer", content=b"{", headers={"Content-Type": "application/json"}
        ),
    ):
        assert bad.status_code >= 400
        ErrorBody.model_validate(bad.json())
    assert Readiness.model_validate(httpx.get(f"{server.http}/readyz").json()).status == "ready"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_server_itself(server, page):
    html = httpx.get(f"{server.http}{page}").text
    referenced = re.findall(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""", html)
    urls = [a or b for a, b in referenced]
    assert urls, html
    assert not re.search(r"https?://", html), html  # no CDN, no font host, no validator
    for url in urls:
        assert url.startswith("/"), url
        r = httpx.get(f"{server.http}{url}")
        assert r.status_code == 200 and len(r.content) > 100, url
    if page == "/docs":
        assert '"validatorUrl": null' in html
        assert any(u.endswith("swagger-ui-bundle.js") for u in urls)


def test_operation_ids_are_unique_and_head_routes_documented(server, spec):
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert {"get", "head"} <= set(spec["paths"][path]), path
        assert httpx.head(f"{server.http}{path}").status_code == 200
    assert "Duplicate Operation ID" not in server.log


def test_favicon_is_served(server):
    r = httpx.get(f"{server.http}/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml" and r.content.startswith(b"<svg")
