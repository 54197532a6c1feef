"""The Open Inference Protocol's repository extension (Triton's ``model_repository``), transport
-free: the HTTP routes (``service.http_api.inference_routes``) and the gRPC servicer
(``service.grpc_api.inference_service``) call these with the data plane and map ``service.errors``
as for every call. The work is the model controller's (``service.model_control``, the plane's
``repository``).

Index works in every mode (in ``--model-control-mode none`` it lists what was loaded at start-up).
Load and unload work only with ``--model-control-mode explicit``, as in Triton; elsewhere they
answer 403 / PERMISSION_DENIED naming the flag, so a server started without it cannot have its
models changed over the network (and the ``model-repository`` access group can require a key).
"""

from __future__ import annotations

from typing import Any

from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.model_control.controller import ModelController
from service.model_control.errors import RepositoryControlOff
from service.model_control.state import READY, UNAVAILABLE

#: Parameters Triton's load takes that cnnserve refuses: a model's configuration is its folder's
#: config.json, and model files arrive through the repository (so that every front end and a
#: restarted server see the same).
_LOAD_REFUSED = "cnnserve loads models from the repository only: put the version folder and config.json there"


def index(plane: DataPlane, ready_only: bool = False) -> list[dict[str, str]]:
    """Triton's repository index: every model version with its state and the reason for it."""
    if plane.repository is not None:
        return plane.repository.index(ready_only)
    state = READY if plane.readiness.is_ready else UNAVAILABLE
    return [
        {"name": m.name, "version": m.version, "state": state, "reason": ""}
        for m in plane.core.models()
        if state == READY or not ready_only
    ]


def _controller(plane: DataPlane, action: str) -> ModelController:
    control = plane.repository
    if control is None or control.mode != "explicit":
        mode = control.mode if control is not None else "none"
        raise RepositoryControlOff(
            f"model {action} is off: this server runs with --model-control-mode {mode}; "
            "start it with --model-control-mode explicit to load and unload models through the API"
        )
    return control


async def load(plane: DataPlane, name: str, parameters: dict[str, Any]) -> None:
    control = _controller(plane, "load")
    refused = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if refused:
        raise InvalidInput(f"load parameter {', '.join(refused)} is not supported: {_LOAD_REFUSED}")
    await control.load(name)


async def unload(plane: DataPlane, name: str, parameters: dict[str, Any]) -> None:
    """``parameters``: ``unload_dependents`` (accepted; cnnserve models have no dependents) and
    cnnserve's ``version`` (a string): unload that one version only."""
    control = _controller(plane, "unload")
    version = parameters.get("version")
    if version is not None and (not isinstance(version, str) or not version.isdigit()):
        raise InvalidInput(f"unload parameter 'version' must be a version number as a string, got {version!r}")
    await control.unload(name, version)
