"""The page for people at GET /: static files from the package (no CDN, no build step) and the
sample images it offers."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles

from service.ascii_numbers import parse_uint
from service.errors import InvalidInput, shown
from service.explain.samples import SOURCE, Samples
from service.http_api.context import HttpContext, json_response
from service.http_api.schemas import error_responses

STATIC = resources.files("service") / "static"


def build_router(ctx: HttpContext) -> APIRouter:
    router = APIRouter(tags=["Page"])
    samples = Samples(ctx.plane.settings.samples_data)
    index_html = (STATIC / "index.html").read_bytes()

    @router.get("/", summary="The explanation page", include_in_schema=False)
    async def page() -> Response:
        return Response(index_html, media_type="text/html; charset=utf-8")

    favicon = (STATIC / "favicon.svg").read_bytes()

    # Browsers ask for /favicon.ico on every page, /docs included: an icon, not a 404 in the log.
    @router.get("/favicon.ico", include_in_schema=False)
    async def favicon_ico() -> Response:
        return Response(favicon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @router.get("/samples", summary="The page's sample images (one per class; empty without the data)")
    async def sample_list() -> Response:
        found = await samples.get()
        return json_response(
            {
                "source": SOURCE if found else None,
                "samples": [
                    {"label": s.label, "class_index": s.class_index, "url": f"/samples/{i}.png"}
                    for i, s in enumerate(found)
                ],
            }
        )

    @router.get(
        "/samples/{index}.png",
        summary="One sample image (PNG, 32x32)",
        responses={200: {"content": {"image/png": {}}}, **error_responses(404)},
    )
    async def sample_image(request: Request) -> Response:
        # Read by hand: a declared path parameter would bring FastAPI's own 422, not our error format.
        # ASCII digits only (service/ascii_numbers.py): str.isdigit() passes '²', which int() refuses.
        index = request.path_params["index"]
        found = await samples.get()
        try:
            number = parse_uint(index, "sample index")
        except InvalidInput:
            number = -1
        if not 0 <= number < len(found):
            return json_response({"error": f"no sample {shown(index)} (there are {len(found)})"}, 404)
        return Response(found[number].png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return router


def static_files() -> StaticFiles:
    return StaticFiles(directory=str(STATIC))
