"""What the transports are handed by ``service.server``: the parts a request may call, built once
per process. The bindings (``service.http_api``, ``service.grpc_api``) and the Open Inference
Protocol (``service.protocol``) reach the core, the explanations, readiness and the model controller
through it and never build any of them."""

from __future__ import annotations

from dataclasses import dataclass

from service.buffers import BufferedBytes
from service.explain.explainer import Explainer
from service.explain.layers import LayerModels
from service.inference.core import InferenceCore
from service.inference.decoding import DecodePool
from service.liveness import Liveness
from service.metrics import Metrics
from service.model_control.controller import ModelController
from service.readiness import Readiness
from service.settings import Settings


@dataclass(frozen=True)
class DataPlane:
    settings: Settings
    metrics: Metrics
    core: InferenceCore  # inference: lookup, classify, infer
    explainer: Explainer
    layer_models: LayerModels  # companion sessions: /explain's layers and v2's layer outputs
    readiness: Readiness
    liveness: Liveness  # /healthz: in one process, whether a batch is out past the hang timeout
    buffers: BufferedBytes  # request bytes held by requests in progress, HTTP and gRPC together
    pool: DecodePool  # the bounded pool: large bodies parsed, v2 layer outputs computed, off the event loop
    #: Loads, reloads and unloads versions while serving (--model-control-mode poll or explicit);
    #: None: the versions found at start-up are served until exit.
    repository: ModelController | None = None
