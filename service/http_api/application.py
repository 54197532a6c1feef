"""The FastAPI application: routers plus the one error mapping for everything HTTP."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from service import __version__
from service.dataplane import DataPlane
from service.errors import ServiceError
from service.http_api import explain_routes, inference_routes, page_routes, routes
from service.http_api.context import HttpContext, error_response, internal_error, json_response
from service.metrics import Metrics

log = logging.getLogger("cnnserve.http")
DOCS_ASSETS = "/docs-assets"  # Swagger UI and ReDoc files


def create_app(plane: DataPlane, metrics: Metrics) -> tuple[FastAPI, ASGIApp]:
    """The FastAPI app (its ``state`` is the server's to set), and the ASGI app to serve: the same
    behind ``routes.DirectRoute``, which serves POST /predict and v2 inference itself, outside
    FastAPI's routing and middleware layers (their routes stay in the app, for the OpenAPI
    document and for any other method on their paths)."""
    # FastAPIOffline serves Swagger UI (/docs) and ReDoc (/redoc) from the files its package
    # ships, so the docs work in a cluster without internet access; no validator badge either.
    app = FastAPIOffline(
        title="cnnserve",
        version=__version__,
        description="Image classification: /predict, /explain, Open Inference Protocol (/v2), metrics; "
        "a page at / that shows what each layer of the network sees.",
        static_url=DOCS_ASSETS,
        swagger_ui_parameters={"validatorUrl": None},
        # FastAPI's own OpenTelemetry hooks ask the tracer/meter/logger providers on every request
        # (6 % of the event loop's time under load); the server's metrics are Prometheus'.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    ctx = HttpContext(plane, metrics)
    app.include_router(routes.build_router(ctx))
    v2_router = inference_routes.build_router(ctx)
    app.include_router(v2_router)
    app.include_router(explain_routes.build_router(ctx))
    app.include_router(page_routes.build_router(ctx))
    app.mount("/static", page_routes.static_files(), name="static")
    predict, infer = routes.predict_endpoint(ctx), inference_routes.direct_infer(ctx, v2_router.routes)
    served = routes.DirectRoute(app, lambda path: predict if path == "/predict" else infer(path))

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        ctx.metrics.rejected.labels("invalid").inc()
        route = request.scope.get("route")
        ctx.metrics.requests.labels("http", getattr(route, "name", "unknown"), "422").inc()
        return json_response({"error": "; ".join(parts) or "invalid request"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return json_response({"error": str(exc.detail)}, exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request, exc)

    return app, served
