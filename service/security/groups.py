"""Access groups (after Triton's restricted APIs): which group each HTTP path and gRPC method is in.

A request's group decides whether it needs a key (``--restricted-apis``). The mapping is by
structure, not by suffix, so a model named ``ready`` or ``stats`` cannot move its metadata into
another group. Anything not listed (the page, /docs, /openapi.json, unknown paths, gRPC
reflection) is ``metadata``; gRPC methods of the inference service that cnnserve does not
implement (shared memory, trace, log settings, model load/unload) are ``model-repository``, the
administrative group, so restricting it covers them when they come.
"""

from __future__ import annotations

HEALTH = "health"
METADATA = "metadata"
INFERENCE = "inference"
EXPLAIN = "explain"
STATISTICS = "statistics"
MODEL_REPOSITORY = "model-repository"
METRICS = "metrics"
GROUPS = (HEALTH, METADATA, INFERENCE, EXPLAIN, STATISTICS, MODEL_REPOSITORY, METRICS)


def expand_groups(names: list[str]) -> list[str]:
    """Validated group names in GROUPS order; ``all`` is every group but health, which stays open
    unless named, so that probes keep working."""
    wanted: set[str] = set()
    for name in names:
        if name == "all":
            wanted.update(g for g in GROUPS if g != HEALTH)
        elif name in GROUPS:
            wanted.add(name)
        else:
            raise ValueError(f"unknown access group {name!r} (known: {', '.join(GROUPS)}, all)")
    return [g for g in GROUPS if g in wanted]


_HTTP_EXACT = {
    "/healthz": HEALTH,
    "/readyz": HEALTH,
    "/predict": INFERENCE,
    "/explain": EXPLAIN,
    "/metrics": METRICS,
    "/v2/health/live": HEALTH,
    "/v2/health/ready": HEALTH,
    "/v2/models/stats": STATISTICS,
}
# The last segment of /v2/models/NAME[/versions/VERSION]/<action>.
_MODEL_ACTIONS = {"ready": HEALTH, "infer": INFERENCE, "stats": STATISTICS, "config": METADATA}


def http_group(path: str) -> str:
    group = _HTTP_EXACT.get(path)
    if group is not None:
        return group
    if path.startswith("/v2/repository"):
        return MODEL_REPOSITORY
    if path.startswith("/v2/models/"):
        parts = path[len("/v2/models/") :].split("/")
        # NAME/ACTION or NAME/versions/VERSION/ACTION; NAME and NAME/versions/VERSION are metadata.
        if len(parts) == 2 or (len(parts) == 4 and parts[1] == "versions"):
            return _MODEL_ACTIONS.get(parts[-1], METADATA)
    return METADATA


_GRPC_INFERENCE = "/inference.GRPCInferenceService/"
_GRPC_METHODS = {
    "ServerLive": HEALTH,
    "ServerReady": HEALTH,
    "ModelReady": HEALTH,
    "ServerMetadata": METADATA,
    "ModelMetadata": METADATA,
    "ModelConfig": METADATA,
    "ModelInfer": INFERENCE,
    "ModelStreamInfer": INFERENCE,
    "ModelStatistics": STATISTICS,
    "RepositoryIndex": MODEL_REPOSITORY,
}


def grpc_group(method: str) -> str:
    """The group of a full gRPC method name (``/package.Service/Method``)."""
    if method.startswith("/grpc.health.v1.Health/"):
        return HEALTH
    if method.startswith(_GRPC_INFERENCE):
        return _GRPC_METHODS.get(method[len(_GRPC_INFERENCE) :], MODEL_REPOSITORY)
    if method == "/cnnserve.v1.Classifier/Classify":
        return INFERENCE
    if method == "/cnnserve.v1.Classifier/Explain":
        return EXPLAIN
    return METADATA
