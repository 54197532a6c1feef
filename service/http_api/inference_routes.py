"""Open Inference Protocol (KServe v2) REST routes with Triton's extensions: HTTP ↔ ``service.protocol.open_inference``.

Routes are thin: they read the path, headers and body, call ``service.protocol`` (bodies
through ``inference_rest``) and write its answer; ``HttpContext.handle`` maps domain errors to
``{"error": "..."}`` with the status of ``service.errors.http_status`` and records the request
metrics.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.routing import BaseRoute

from service.errors import InvalidInput, ModelNotFound
from service.http_api import inference_rest as rest
from service.http_api.context import HttpContext, get_and_head, json_response
from service.http_api.routes import DirectMatch, Endpoint
from service.http_api.schemas import V2_INFER_REQUEST_BODY, error_responses
from service.protocol import metadata
from service.protocol import model_repository as repository
from service.protocol import open_inference as v2

BINARY_CONTENT_TYPE = "application/octet-stream"
INFER_PATH, INFER_VERSION_PATH = "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"
Infer = Callable[[Request, str, str | None], Awaitable[Response]]


def build_router(ctx: HttpContext) -> APIRouter:
    # Every /v2 error is {"error": ...}; declaring 4XX/5XX also keeps FastAPI from advertising its
    # own 422 HTTPValidationError, which these routes never send.
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"], responses=error_responses("4XX", "5XX"))
    plane, readiness = ctx.plane, ctx.plane.readiness

    async def _json(value_fn: Callable[..., object], *args: str | None) -> Response:
        return json_response(value_fn(plane, *args))

    # ---- server ---------------------------------------------------------------------------------
    @router.get("", summary="Server metadata: name, version, extensions")
    async def server_metadata() -> Response:
        return await ctx.handle("v2_server_metadata", _json(lambda _plane: metadata.server_metadata()))

    @get_and_head(router, "/health/live", summary="Liveness (200 while the process answers)")
    async def server_live() -> Response:
        return json_response({"live": True})

    @get_and_head(router, "/health/ready", summary="Readiness (200 ready, 503 loading or draining)")
    async def server_ready() -> Response:
        reason = readiness.reason()
        if reason is None:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": f"not ready: {reason}"}, 503)

    # ---- model repository extension (service.protocol.model_repository) -------------------------
    async def _repository_body(request: Request) -> dict[str, Any]:
        """A repository request's JSON object (tritonclient sends none, {} or {"parameters": ...})."""
        raw = await ctx.body(request)
        if not raw.strip():
            return {}
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("parameters", {}), dict):
            raise InvalidInput('request body must be a JSON object, its "parameters" an object')
        return doc

    async def _index(request: Request) -> Response:
        ready = (await _repository_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput(f'"ready" must be true or false, got {ready!r}')
        return json_response(repository.index(plane, ready))

    async def _load(request: Request, name: str) -> Response:
        await repository.load(plane, name, (await _repository_body(request)).get("parameters", {}))
        return json_response({})

    async def _unload(request: Request, name: str) -> Response:
        await repository.unload(plane, name, (await _repository_body(request)).get("parameters", {}))
        return json_response({})

    @router.post("/repository/index", summary="Model versions in the repository, their state and reason")
    async def repository_index(request: Request) -> Response:
        return await ctx.handle("v2_repository_index", _index(request), request)

    @router.post("/repository/models/{name}/load", summary="Load or reload a model (--model-control-mode explicit)")
    async def repository_load(request: Request, name: str) -> Response:
        return await ctx.handle("v2_repository_load", _load(request, name), request)

    @router.post("/repository/models/{name}/unload", summary="Unload a model (--model-control-mode explicit)")
    async def repository_unload(request: Request, name: str) -> Response:
        return await ctx.handle("v2_repository_unload", _unload(request, name), request)

    # ---- statistics (before /models/{name} so that "stats" is not taken for a model name) -------
    @router.get("/models/stats", summary="Statistics of every model (Triton's statistics extension)")
    async def all_statistics() -> Response:
        return await ctx.handle("v2_model_statistics", _json(metadata.model_statistics))

    @router.get("/models/{name}/stats", summary="Statistics of every version of a model")
    @router.get("/models/{name}/versions/{version}/stats", summary="Statistics of a model version")
    async def model_statistics(name: str, version: str | None = None) -> Response:
        return await ctx.handle("v2_model_statistics", _json(metadata.model_statistics, name, version))

    # ---- models ---------------------------------------------------------------------------------
    @router.get("/models/{name}", summary="Model metadata: versions, platform, inputs, outputs")
    @router.get("/models/{name}/versions/{version}", summary="Model version metadata")
    async def model_metadata(name: str, version: str | None = None) -> Response:
        return await ctx.handle("v2_model_metadata", _json(metadata.model_metadata, name, version))

    async def _model_ready(name: str, version: str | None) -> Response:
        if metadata.model_ready(plane, name, version):
            return json_response({"name": name, "ready": True})
        return json_response({"name": name, "ready": False, "error": f"not ready: {readiness.reason()}"}, 503)

    @router.get("/models/{name}/ready", summary="Model readiness (200 ready, 503 not ready, 404 unknown)")
    @router.get("/models/{name}/versions/{version}/ready", summary="Model version readiness")
    async def model_ready(name: str, version: str | None = None) -> Response:
        return await ctx.handle("v2_model_ready", _model_ready(name, version))

    @router.get("/models/{name}/config", summary="Model configuration (Triton's model_configuration extension)")
    @router.get("/models/{name}/versions/{version}/config", summary="Model version configuration")
    async def model_config(name: str, version: str | None = None) -> Response:
        return await ctx.handle("v2_model_config", _json(metadata.model_config, name, version))

    # ---- inference ------------------------------------------------------------------------------
    infer = infer_endpoint(ctx)
    body = {"requestBody": V2_INFER_REQUEST_BODY}

    @router.post("/models/{name}/infer", summary="Inference (JSON or binary tensor data)", openapi_extra=body)
    @router.post("/models/{name}/versions/{version}/infer", summary="Inference on a model version", openapi_extra=body)
    async def model_infer(request: Request, name: str, version: str | None = None) -> Response:
        return await infer(request, name, version)

    return router


def infer_endpoint(ctx: HttpContext) -> Infer:
    """POST /v2/models/{name}[/versions/{version}]/infer: served by ``direct_infer``'s match ahead of
    FastAPI's routing, and registered as routes too, for the OpenAPI document."""
    plane = ctx.plane

    def _max_numbers(name: str, version: str | None) -> int | None:
        """The most tensor elements a request to this model can carry (None: model unknown,
        refused later with its own error)."""
        try:
            shape = plane.core.model(name, version).runtime.input_shape[1:]
        except ModelNotFound:
            return None
        if not all(isinstance(d, int) and d > 0 for d in shape):
            return None  # a dynamic image size: no bound known before the body is parsed
        return plane.settings.max_images_per_request * int(math.prod(shape))

    async def _infer(request: Request, name: str, version: str | None) -> Response:
        deadline = ctx.deadline(request)
        ctx.core.precheck(name, version)  # queue full or not ready: refused before the body is read
        parsed = await rest.read_rest_request(
            name,
            version or "",
            await ctx.body(request),
            request.headers.get(rest.HEADER_LENGTH),
            request.headers.get("content-encoding"),
            ctx.max_body,
            plane.pool.offload,
            _max_numbers(name, version),
        )
        result = await ctx.unless_disconnected(v2.infer(plane, parsed, deadline), request)
        content, header_length = rest.encode_rest_response(result)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content, media_type=BINARY_CONTENT_TYPE, headers={"Inference-Header-Content-Length": str(header_length)}
        )

    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        return await ctx.handle("v2_infer", _infer(request, name, version), request)

    return infer


def infer_path(path: str) -> tuple[str, str | None] | None:
    """(name, version or None) of ``/v2/models/{name}[/versions/{version}]/infer``, as FastAPI's
    router matches it (each a non-empty path segment); None for any other path."""
    if not path.startswith("/v2/models/") or not path.endswith("/infer"):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def direct_infer(ctx: HttpContext, router_routes: list[BaseRoute]) -> DirectMatch:
    """The match of ``routes.DirectRoute`` for v2 inference: a path → its endpoint, with the name
    and version the path gives. ``router_routes`` (those of ``build_router``'s router)
    gives each request the route FastAPI would have matched, for what reads it (tracing's span
    name: the route's template)."""
    infer = infer_endpoint(ctx)
    by_path = {path: r for r in router_routes if (path := getattr(r, "path", None)) in (INFER_PATH, INFER_VERSION_PATH)}
    plain, versioned = by_path[INFER_PATH], by_path[INFER_VERSION_PATH]

    def match(path: str) -> Endpoint | None:
        found = infer_path(path)
        if found is None:
            return None
        name, version = found
        route = plain if version is None else versioned

        async def endpoint(request: Request) -> Response:
            request.scope["route"] = route
            return await infer(request, name, version)

        return endpoint

    return match
