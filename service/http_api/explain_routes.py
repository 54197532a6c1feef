"""POST /explain: /predict's bodies and query, plus the attribution and the layers of each image."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.errors import InvalidParameter
from service.explain.attribution import DEFAULT_METHOD, METHODS
from service.explain.explainer import Explanations
from service.http_api.context import HttpContext, json_response
from service.http_api.routes import PREDICT_DOC, PREDICT_PARAMETERS, int_parameter, read_images
from service.http_api.schemas import PREDICT_REQUEST_BODY, ExplainResponse, error_responses

EXPLAIN_DOC = f"""Explain the model's answer for one or more images (at most `explain_max_images`).

Takes the same bodies, query parameters and header as `/predict`, plus `target` (class index to
explain; default each image's top-1), `method` ({", ".join(METHODS)}; default {DEFAULT_METHOD}) and
`seed` (for rise; default 0), as query parameters or fields of the JSON body.

Each result holds `predictions` (as in `/predict`), `attribution` (`method`, `class_index`,
`label`, `height`, `width`, `values`: `height` rows of `width` floats on the model's 32x32 input,
positive where hiding the pixels lowers the class's probability) and `layers`: `conv1`, `conv2`,
`pool` (per-channel `maps` as base64 PNG, each scaled to its channel's maximum given in `maxima`;
`conv1` also has its 32 `filters` as 3x3 RGB PNGs), `fc3` and `fc4` (`values`).

Explanations have their own limits: past `explain_concurrency` running and `explain_queue_size`
waiting, 429 at once. Other errors as for /predict.

{PREDICT_DOC.split("Bodies:", 1)[1]}"""

EXPLAIN_PARAMETERS = [
    *PREDICT_PARAMETERS,
    {
        "name": "target",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0},
        "description": "Class index to explain (default: each image's top-1)",
    },
    {
        "name": "method",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(METHODS)},
        "description": f"Attribution method (default {DEFAULT_METHOD})",
    },
    {
        "name": "seed",
        "in": "query",
        "required": False,
        "schema": {"type": "integer"},
        "description": "Seed of rise's random masks (default 0)",
    },
]


def _layer_json(layer: dict[str, Any]) -> dict[str, Any]:
    out = dict(layer)
    for key in ("maps", "filters"):
        if key in out:
            out[key] = [base64.b64encode(png).decode() for png in out[key]]
    return out


def explanations_json(result: Explanations) -> dict[str, Any]:
    return {
        "model": result.model,
        "model_version": result.version,
        "results": [
            {
                "predictions": [
                    {"label": l, "index": i, "probability": p} for l, i, p in zip(r.labels, r.indices, r.probabilities)
                ],
                "attribution": {
                    "method": r.method,
                    "class_index": r.class_index,
                    "label": r.label,
                    "height": r.values.shape[0],
                    "width": r.values.shape[1],
                    "values": r.values,
                },
                "layers": [_layer_json(layer) for layer in r.layers],
            }
            for r in result.results
        ],
    }


def _field(query_value: str | None, fields: dict[str, Any], name: str) -> int | None:
    """A query parameter (text, parsed as an integer) or else the JSON body's field (must be an integer)."""
    if query_value not in (None, ""):
        return int_parameter(name, query_value)
    value = fields.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    return value


def build_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter()
    explainer = ctx.plane.explainer

    async def _explain(request: Request) -> Response:
        deadline = ctx.deadline(request)
        parsed = await read_images(ctx, request)
        query = request.query_params
        target = _field(query.get("target"), parsed.fields, "target")
        seed = _field(query.get("seed"), parsed.fields, "seed")
        method = query.get("method") or parsed.fields.get("method")
        if method is not None and not isinstance(method, str):
            raise InvalidParameter(f"method must be a string, got {method!r}")
        result = await ctx.unless_disconnected(
            explainer.explain(
                parsed.images,
                top_k=parsed.top_k,
                model=parsed.model,
                version=parsed.version,
                target=target,
                method=method,
                seed=seed or 0,
                deadline=deadline,
            ),
            request,
        )
        return json_response(explanations_json(result))

    @router.post(
        "/explain",
        summary="Explain images: top-k, attribution map and every layer's activations",
        description=EXPLAIN_DOC,
        responses={
            200: {"model": ExplainResponse, "description": "One explanation per image, in order"},
            **error_responses(400, 404, 413, 415, 422, 429, 503, 504),
        },
        openapi_extra={"parameters": EXPLAIN_PARAMETERS, "requestBody": PREDICT_REQUEST_BODY},
    )
    async def explain(request: Request) -> Response:
        return await ctx.handle("explain", _explain(request), request)

    return router
