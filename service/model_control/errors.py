"""The repository extension's own errors (``service.errors`` maps them like every other)."""

from __future__ import annotations

import grpc

from service.errors import InvalidInput, ServiceError


class ModelLoadFailed(InvalidInput):
    """A load request found the model but could not serve what it asked: a version that does not
    load, a malformed config.json, no version at all. As in Triton: HTTP 400, and whatever served
    before keeps serving."""

    reason = "load_failed"


class RepositoryControlOff(ServiceError):
    """Load or unload asked of a server whose model control mode does not take them (as Triton,
    only ``--model-control-mode explicit`` does)."""

    reason = "repository_control_off"
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
