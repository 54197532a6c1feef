"""The uvicorn configuration of the HTTP server: protocol, limits and timeouts from Settings."""

from __future__ import annotations

import ssl
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from service.http_api.httptools_limits import HttpLimits, protocol_class
from service.settings import Settings


def uvicorn_config(
    app: ASGIApp, settings: Settings, ssl_context: ssl.SSLContext | None = None, **overrides: Any
) -> uvicorn.Config:
    """uvicorn.Config for ``app`` (loop and lifespan driven by the caller): httptools with
    cnnserve's header limits and read timeouts, ``max_connections`` as uvicorn's concurrency limit
    (503 past it), the keep-alive timeout, and graceful shutdown bounded by the shutdown timeout."""
    limits = HttpLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections_per_client=settings.max_connections_per_client,
    )
    options: dict[str, Any] = dict(
        lifespan="off",
        access_log=False,
        log_config=None,
        log_level=settings.log_level.lower(),
        loop="none",
        http=protocol_class(limits),
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_seconds)),
        limit_concurrency=settings.max_connections,
        backlog=2048,
    )
    if ssl_context is not None:
        # TLS with a context made by service.security.tls, which reloads its certificate in place
        # (a context from uvicorn's own ssl_* options would never be reloaded).
        options["ssl_context_factory"] = lambda _config, _default: ssl_context
    options.update(overrides)
    return uvicorn.Config(app, **options)
