"""cnnserve's own HTTP API: /predict, /healthz, /readyz, /metrics."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send

from service.ascii_numbers import parse_uint
from service.errors import InvalidInput, InvalidParameter, PayloadTooLarge, UnsupportedMediaType
from service.http_api import multipart
from service.http_api.context import TIMEOUT_HEADER, HttpContext, get_and_head, internal_error, json_response
from service.http_api.schemas import (
    PREDICT_REQUEST_BODY,
    Liveness,
    PredictResponse,
    Readiness,
    error_responses,
)
from service.inference.decoding import INLINE_DECODE_BYTES as INLINE_PARSE_BYTES
from service.inference.serving import Classification, ImageInput

PREDICT_DOC = f"""Classify one or more images and answer each one's top-k labels with probabilities.

Bodies:
- `image/jpeg`, `image/png` (or any `image/*`, or `application/octet-stream`): one image.
- `multipart/form-data`: one or more parts named `file`.
- `application/json`: `{{"images": ["<base64 JPEG/PNG>", ...], "top_k": 3}}`.

Images are converted to RGB, centre-cropped to the model's aspect ratio and resized to its input size.
Header `{TIMEOUT_HEADER}`: give up (504) if the request is still queued after this many milliseconds.
Errors: `{{"error": "..."}}` with 400 bad image, 404 unknown model, 413 too large, 415 unsupported
type, 422 invalid parameter, 429 queue full (with Retry-After), 503 not ready, 504 deadline.
"""

Endpoint = Callable[[Request], Awaitable[Response]]
IMAGE_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")


def classification_json(result: Classification, files: list[str] | None = None) -> dict[str, Any]:
    results: list[dict[str, Any]] = [
        {"predictions": [{"label": l, "index": i, "probability": p} for l, i, p in zip(ls, ix, ps)]}
        for ls, ix, ps in zip(result.labels, result.indices, result.probabilities)
    ]
    for entry, name in zip(results, files or ()):  # multipart: which result is which file
        entry["file"] = name
    return {"model": result.model, "model_version": result.version, "results": results}


def name_files(error: InvalidInput | PayloadTooLarge, files: list[str]) -> None:
    """The core numbers a request's images ("image 1: not an image"); a multipart request's
    files have names: "image 1 (dog.png): ..."."""
    error.message = re.sub(
        r"^image (\d+):",
        lambda m: f"image {m.group(1)} ({files[int(m.group(1))]}):" if int(m.group(1)) < len(files) else m.group(0),
        error.message,
    )
    error.args = (error.message,)


PREDICT_PARAMETERS = [
    {
        "name": "top_k",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 10},
        "description": "Labels per image, 1-10 (default 5)",
    },
    {
        "name": "model",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Model name (default: the bundled one)",
    },
    {
        "name": "version",
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "Model version (default: the highest)",
    },
    {
        "name": "X-Request-Timeout-Ms",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?$"},
        "description": "Deadline in milliseconds (ASCII digits, optionally a decimal part): 504 past it",
    },
]


def int_parameter(name: str, text: str | None) -> int | None:
    if text is None or text == "":
        return None
    return parse_uint(text, name, InvalidParameter)


@dataclass
class ImagesRequest:
    """What /predict and /explain read from a request: the images, the query's or JSON body's
    top_k / model / version, and the JSON body's other fields (empty for other bodies)."""

    images: list[ImageInput]
    top_k: int | None
    model: str | None
    version: str | None
    fields: dict[str, Any]
    files: list[str] | None = None  # multipart: each image's filename, so the answer can name it


def parse_json_body(body: bytes, max_images: int = 256) -> tuple[list[ImageInput], object, object, object]:
    """/predict's JSON body → (image bytes, top_k, model, model_version) as given (checked later)."""
    images, doc = _json_document(body, max_images)
    return images, doc.get("top_k"), doc.get("model"), doc.get("model_version")


#: Commas a /predict JSON body may hold beyond one per image: its other fields (top_k, model, ...).
JSON_FIELD_COMMAS = 64


def _json_document(body: bytes, max_images: int) -> tuple[list[ImageInput], dict[str, Any]]:
    """The JSON body's decoded images and the whole document (for /explain's own fields). The
    image count is checked before any image is decoded, and bounded before the body is even
    parsed: base64 has no commas, so a body with more commas than images allowed (plus a few
    fields) is refused without building its millions of strings (the issue: 5.5 M empty strings,
    6.2 s and +100 MB before the 413)."""
    if body.count(b",") > max_images + JSON_FIELD_COMMAS:
        raise PayloadTooLarge(f"JSON body holds more than {max_images} images; the limit is {max_images}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise InvalidInput('JSON body must be an object with "images": a list of base64 strings')
    if len(doc["images"]) > max_images:
        raise PayloadTooLarge(f"{len(doc['images'])} images in one request; the limit is {max_images}")
    images: list[ImageInput] = []
    for i, item in enumerate(doc["images"]):
        if not isinstance(item, str):
            raise InvalidInput(f"images[{i}] must be a base64 string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{i}] is not valid base64") from None
    return images, doc


async def read_images(ctx: HttpContext, request: Request) -> ImagesRequest:
    """The images and common parameters of a /predict or /explain request, from any body type
    PREDICT_DOC lists (query parameters win over the JSON body's)."""
    query = request.query_params
    top_k = int_parameter("top_k", query.get("top_k"))
    model, version = query.get("model") or None, query.get("version") or None
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    doc: dict[str, Any] = {}
    ctx.core.precheck(model, version)  # queue full or not ready: refused before the body is read
    if content_type == "multipart/form-data":
        body = await ctx.body(request)  # bounded by max_request_bytes
        files: list[str] = []
        args = (body, request.headers.get("content-type", ""), ctx.plane.settings.max_images_per_request, files)
        if len(body) <= INLINE_PARSE_BYTES:
            images: list[ImageInput] = list(multipart.file_parts(*args))
        else:  # parsing megabytes: off the event loop
            images = list(await ctx.plane.pool.offload(multipart.file_parts, *args))
        if not images:
            raise InvalidInput('multipart body has no file part named "file"')
    elif content_type == "application/json":
        body = await ctx.body(request)
        limit = ctx.plane.settings.max_images_per_request
        if len(body) <= INLINE_PARSE_BYTES:
            images, doc = _json_document(body, limit)
        else:  # parsing and base64-decoding megabytes: off the event loop
            images, doc = await ctx.plane.pool.offload(_json_document, body, limit)
        top_k = top_k if top_k is not None else doc.get("top_k")
        model = model or doc.get("model")
        version = version or doc.get("model_version")
    elif content_type.startswith(IMAGE_TYPES):
        images = [await ctx.body(request)]
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type {content_type or '(none)'!r}: send image/jpeg, image/png, "
            "multipart/form-data or application/json"
        )
    if (model is not None and not isinstance(model, str)) or (version is not None and not isinstance(version, str)):
        raise InvalidInput("model and model_version must be strings")
    return ImagesRequest(images, top_k, model, version, doc, files if content_type == "multipart/form-data" else None)


def predict_endpoint(ctx: HttpContext) -> Endpoint:
    """POST /predict's endpoint: served by ``DirectRoute`` ahead of FastAPI's routing, and
    registered as a route too, for the OpenAPI document."""
    core = ctx.core

    async def _predict(request: Request) -> Response:
        deadline = ctx.deadline(request)
        parsed = await read_images(ctx, request)
        try:
            result = await ctx.unless_disconnected(
                core.classify(
                    parsed.images, top_k=parsed.top_k, model=parsed.model, version=parsed.version, deadline=deadline
                ),
                request,
            )
        except (InvalidInput, PayloadTooLarge) as e:
            if parsed.files:
                name_files(e, parsed.files)
            raise
        return json_response(classification_json(result, parsed.files))

    async def predict(request: Request) -> Response:
        return await ctx.handle("predict", _predict(request), request)

    return predict


#: A POST path → the endpoint that serves it directly, or None (FastAPI routes it).
DirectMatch = Callable[[str], Endpoint | None]


class DirectRoute:
    """ASGI app in front of the FastAPI app that serves the POST requests ``match`` claims with
    their endpoint itself: FastAPI's routing (its match over every route, per-request scope copies
    and exception wrappers) was ~20 % of /predict's CPU at 64 callers, and its middleware layers
    (error, telemetry and body-limit wrappers, each a coroutine per request and per message sent)
    another ~5 % (bench/profile_path.py). Only for endpoints that take the Request as it is and map
    their own errors (``HttpContext.handle``); what escapes one is answered 500 and logged, as the
    app's own handler does. Other methods on those paths (405) and other paths go to the app."""

    def __init__(self, app: ASGIApp, match: DirectMatch) -> None:
        self.app = app
        self.match = match

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.match(scope["path"])
            if endpoint is not None:
                request = Request(scope, receive, send)
                try:
                    response = await endpoint(request)
                except Exception as e:
                    response = internal_error(request, e)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    core = ctx.core

    # Query parameters are read by hand (and documented through openapi_extra): FastAPI's
    # dependency solving was ~40 % of this route's Python time. Served by DirectRoute; the route
    # is what the OpenAPI document describes.
    router.add_api_route(
        "/predict",
        predict_endpoint(ctx),
        methods=["POST"],
        summary="Classify images (top-k labels with probabilities)",
        description=PREDICT_DOC,
        responses={
            200: {"model": PredictResponse, "description": "One result per image, in order"},
            **error_responses(400, 404, 413, 415, 422, 429, 503, 504),
        },
        openapi_extra={"parameters": PREDICT_PARAMETERS, "requestBody": PREDICT_REQUEST_BODY},
        name="predict",
    )

    @get_and_head(
        router,
        "/healthz",
        summary="Liveness: the process answers (one process: and no batch is out past --hang-timeout-seconds)",
        responses={200: {"model": Liveness}, 503: {"model": Liveness, "description": "a batch thread is hung"}},
    )
    async def healthz() -> Response:
        hung = ctx.plane.liveness.reason()
        if hung is not None:  # one process: its batch thread is stuck (service.liveness)
            return json_response({"status": "hung", "reason": hung}, 503)
        return json_response({"status": "live"})

    @get_and_head(
        router,
        "/readyz",
        summary="Readiness: every model loaded and warm, not draining",
        responses={200: {"model": Readiness}, 503: {"model": Readiness, "description": "loading or draining"}},
    )
    async def readyz(request: Request) -> Response:
        models = [
            {
                "name": m.name,
                "version": m.version,
                "provider": m.runtime.provider,
                "precision": m.runtime.precision,
                "file": m.runtime.path.name,
                "precision_choice": getattr(m.runtime, "precision_choice", None),
            }
            for m in core.models()
        ]
        reason = ctx.plane.readiness.reason()
        if reason is None:
            # The gRPC port must answer too (service/grpc_api/self_check.py; set by service/server.py).
            grpc_check = getattr(request.app.state, "grpc_self_check", None)
            failure = await grpc_check.failure() if grpc_check is not None else None
            if failure is None:
                return json_response({"status": "ready", "models": models})
            return json_response(
                {"error": f"not ready: {failure}", "status": "grpc_unavailable", "models": models}, 503
            )
        return json_response({"error": f"not ready: {reason}", "status": reason, "models": models}, 503)

    @router.get(
        "/metrics",
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "text format"}},
    )
    async def metrics() -> Response:
        return Response(ctx.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
