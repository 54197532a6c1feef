"""Access groups and keys as units: which group each HTTP path and gRPC method is in, key entries
and their errors, the policy's 401/403 decisions (tests/test_security.py runs them on a server)."""

from __future__ import annotations

import pytest

from service.security.access import AccessConfigError, AccessPolicy, parse_keys
from service.security.groups import GROUPS, expand_groups, grpc_group, http_group

ADMIN_KEY = "admin-key-0123456789abcdef"
INFER_KEY = "infer-key-0123456789abcdef"
WRONG_KEY = "wrong-key-0123456789abcdef"


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/healthz", "health"),
        ("/readyz", "health"),
        ("/v2/health/ready", "health"),
        ("/v2/models/cifar10/ready", "health"),
        ("/v2/models/cifar10/versions/1/ready", "health"),
        ("/v2/models/ready", "metadata"),  # a model named "ready": its metadata, not health
        ("/v2/models/stats", "statistics"),
        ("/v2/models/cifar10/versions/1/stats", "statistics"),
        ("/v2/models/cifar10", "metadata"),
        ("/v2/models/cifar10/config", "metadata"),
        ("/v2", "metadata"),
        ("/", "metadata"),
        ("/openapi.json", "metadata"),
        ("/predict", "inference"),
        ("/v2/models/cifar10/infer", "inference"),
        ("/v2/models/cifar10/versions/1/infer", "inference"),
        ("/v2/models/x/y/z/infer", "metadata"),  # no such route: not inference
        ("/explain", "explain"),
        ("/v2/repository/index", "model-repository"),
        ("/v2/repository/models/cifar10/load", "model-repository"),
        ("/metrics", "metrics"),
    ],
)
def test_http_paths_are_in_their_group(path, group):
    assert http_group(path) == group


def test_grpc_methods_are_in_their_group():
    assert grpc_group("/grpc.health.v1.Health/Check") == "health"
    assert grpc_group("/inference.GRPCInferenceService/ServerReady") == "health"
    assert grpc_group("/inference.GRPCInferenceService/ModelInfer") == "inference"
    assert grpc_group("/inference.GRPCInferenceService/ModelStatistics") == "statistics"
    assert grpc_group("/inference.GRPCInferenceService/RepositoryModelLoad") == "model-repository"
    assert grpc_group("/inference.GRPCInferenceService/CudaSharedMemoryRegister") == "model-repository"
    assert grpc_group("/cnnserve.v1.Classifier/Classify") == "inference"
    assert grpc_group("/cnnserve.v1.Classifier/Explain") == "explain"
    assert grpc_group("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "metadata"


def test_all_leaves_health_open_and_unknown_groups_are_refused():
    assert expand_groups(["all"]) == [g for g in GROUPS if g != "health"]
    assert expand_groups(["all", "health"]) == list(GROUPS)
    with pytest.raises(ValueError, match="unknown access group 'admin'"):
        expand_groups(["admin"])


def test_key_entries_and_their_errors_never_show_the_key():
    keys = parse_keys(f"# comment\n{ADMIN_KEY}\ninference,metadata:{INFER_KEY}  # trailing\n", "f")
    assert keys == [(ADMIN_KEY.encode(), frozenset(GROUPS)), (INFER_KEY.encode(), frozenset({"inference", "metadata"}))]
    for text in ("tiny-k3y", f"nogroup:{ADMIN_KEY}", f"inference:{ADMIN_KEY[:10]}"):
        with pytest.raises(AccessConfigError) as e:
            parse_keys(text, "keys.txt")
        assert "keys.txt, line 1" in str(e.value)
        assert ADMIN_KEY[:10] not in str(e.value) and "tiny-k3y" not in str(e.value)
    with pytest.raises(AccessConfigError, match="needs at least one key"):
        AccessPolicy(["inference"], [])


def test_policy_answers_401_without_or_with_an_unknown_key_and_403_for_another_group():
    policy = AccessPolicy(["inference", "metrics"], parse_keys(f"inference:{INFER_KEY}", "env"))
    assert policy.check("health", None, None) is None
    assert policy.check("inference", f"Bearer {INFER_KEY}".encode(), None) is None
    assert policy.check("inference", None, INFER_KEY.encode()) is None
    missing = policy.check("inference", b"Basic dXNlcjpwYXNz", None)
    assert missing is not None and (missing.authenticated, missing.reason) == (False, "missing_key")
    invalid = policy.check("inference", None, WRONG_KEY.encode())
    assert invalid is not None and (invalid.authenticated, invalid.reason) == (False, "invalid_key")
    forbidden = policy.check("metrics", None, INFER_KEY.encode())
    assert forbidden is not None and (forbidden.authenticated, forbidden.reason) == (True, "forbidden")
