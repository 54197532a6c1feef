"""TLS and access keys against one real server (TLS on, every group but health restricted): curl,
httpx, tritonclient HTTP and gRPC, grpc stubs, grpcurl, ``cnnserve classify`` and ``cnnserve
loadtest``; each access group on both protocols (the mapping itself: tests/test_access_groups.py)."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2, classifier_pb2_grpc
from tests.certs import handshake, make_tls
from tests.conftest import MODEL_PATH, ROOT, ServerProcess, png_bytes

ADMIN_KEY = "admin-key-0123456789abcdef"  # in the key file: every group
INFER_KEY = "infer-key-0123456789abcdef"  # in the environment: inference only
WRONG_KEY = "wrong-key-0123456789abcdef"
IMAGE = png_bytes(np.full((32, 32, 3), 120, np.uint8))


pytestmark = pytest.mark.skipif(not MODEL_PATH.is_file(), reason="bundled model models/cifar10/1/model.onnx missing")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tls):
    keys = tls.dir / "keys.txt"
    keys.write_text(f"# the administrators' key\n{ADMIN_KEY}\n")
    keys.chmod(0o600)
    s = ServerProcess(
        "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
        "--restricted-apis", "all", "--access-keys-file", str(keys), "--drain-seconds", "0",
        env={"CNNSERVE_ACCESS_KEYS": f"inference:{INFER_KEY}"},
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log
    assert ADMIN_KEY not in s.log and INFER_KEY not in s.log and WRONG_KEY not in s.log


@pytest.fixture(scope="module")
def https(server, tls):
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    with httpx.Client(base_url=f"https://127.0.0.1:{server.http_port}", verify=ctx, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server, tls):
    creds = grpc.ssl_channel_credentials(tls.ca.read_bytes())
    with grpc.secure_channel(server.grpc_target, creds) as ch:
        yield ch


def test_start_up_line_says_what_is_open(server):
    line = next(line for line in server.lines if "security:" in line)
    assert "TLS on for HTTP and gRPC" in line
    assert "open to anyone who reaches the ports: health;" in line
    assert "key required: metadata, inference, explain, statistics, model-repository, metrics (2 key(s) loaded)" in line


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_curl_speaks_tls_1_2_and_1_3_and_nothing_older_or_plain(server, tls):
    url = f"https://127.0.0.1:{server.http_port}/readyz"
    for version in ("--tls-max 1.2", "--tlsv1.3"):
        out = _curl("--cacert", str(tls.ca), *version.split(), url)
        assert out.stdout == "200", out.stderr
    old = _curl("--cacert", str(tls.ca), "--tlsv1.1", "--tls-max", "1.1", url)
    assert old.returncode != 0 and old.stdout == "000"  # refused in the handshake
    plain = _curl(f"http://127.0.0.1:{server.http_port}/readyz")
    assert plain.returncode != 0 and plain.stdout == "000"
    untrusted = _curl(url)  # the system CAs do not know the test CA
    assert untrusted.returncode == 60, untrusted.stderr


def test_alpn_is_h2_on_grpc_and_http_1_1_on_http(server, tls):
    assert handshake(server.grpc_port, tls.ca, "h2")[1] == "h2"
    assert handshake(server.http_port, tls.ca, "http/1.1")[1] == "http/1.1"


# Per group: an HTTP request and a gRPC call that reach it, and what a right key gets.
HTTP_CALLS = {
    "metadata": ("GET", "/v2/models/cifar10", None, 200),
    "inference": ("POST", "/predict", IMAGE, 200),
    "explain": ("POST", "/explain", b"{}", 400),  # past the gate: the empty body is refused
    "statistics": ("GET", "/v2/models/stats", None, 200),
    "model-repository": ("POST", "/v2/repository/index", b"{}", 200),
    "metrics": ("GET", "/metrics", None, 200),
}


def _http(https, group: str, headers: dict) -> httpx.Response:
    method, path, body, _ = HTTP_CALLS[group]
    content_type = "image/png" if body is IMAGE else "application/json"
    return https.request(method, path, content=body, headers={"content-type": content_type, **headers})


@pytest.mark.parametrize("group", list(HTTP_CALLS))
def test_each_http_group_needs_its_key(https, group):
    r = _http(https, group, {})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == (
        f"the {group} API needs a key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )
    r = _http(https, group, {"X-API-Key": WRONG_KEY})
    assert r.status_code == 401 and WRONG_KEY not in r.text
    r = _http(https, group, {"Authorization": f"Bearer {INFER_KEY}"})
    if group == "inference":
        assert r.status_code == 200, r.text
    else:
        assert r.status_code == 403 and r.json()["error"] == f"the key sent does not give access to the {group} API"
    r = _http(https, group, {"Authorization": f"bearer {ADMIN_KEY}"})
    assert r.status_code == HTTP_CALLS[group][3], r.text


def test_health_stays_open_on_both_protocols(https, channel):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v2/models/cifar10/ready"):
        assert https.get(path).status_code == 200, path
    assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(service_pb2.ServerReadyRequest()).ready
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def _grpc_calls(channel):
    """Per group: a call taking the metadata to send, and what an all-groups key gets."""
    v2 = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    cls = classifier_pb2_grpc.ClassifierStub(channel)
    classify = classifier_pb2.ClassifyRequest(images=[classifier_pb2.Image(encoded=IMAGE)])
    ok, invalid = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT
    return {
        "metadata": (lambda md: v2.ModelMetadata(service_pb2.ModelMetadataRequest(name="cifar10"), metadata=md), ok),
        "inference": (lambda md: cls.Classify(classify, metadata=md), ok),
        # past the gate: a request without images is refused
        "explain": (lambda md: cls.Explain(classifier_pb2.ExplainRequest(), metadata=md), invalid),
        "statistics": (lambda md: v2.ModelStatistics(service_pb2.ModelStatisticsRequest(), metadata=md), ok),
        "model-repository": (lambda md: v2.RepositoryIndex(service_pb2.RepositoryIndexRequest(), metadata=md), ok),
    }


def _code(call, metadata) -> grpc.StatusCode:
    try:
        call(metadata)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("group", ["metadata", "inference", "explain", "statistics", "model-repository"])
def test_each_grpc_group_needs_its_key(channel, group):
    call, with_admin = _grpc_calls(channel)[group]
    with pytest.raises(grpc.RpcError) as e:
        call(())
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert e.value.details() == (
        f"the {group} API needs a key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )
    assert _code(call, (("x-api-key", WRONG_KEY),)) == grpc.StatusCode.UNAUTHENTICATED
    infer = _code(call, (("authorization", f"Bearer {INFER_KEY}"),))
    assert infer == (grpc.StatusCode.OK if group == "inference" else grpc.StatusCode.PERMISSION_DENIED)
    assert _code(call, (("authorization", f"Bearer {ADMIN_KEY}"),)) == with_admin


def test_tritonclient_http_and_grpc_over_tls_with_a_key(server, tls):
    x = np.zeros((1, 3, 32, 32), np.float32)
    with thttp.InferenceServerClient(
        server.http_address, ssl=True, ssl_options={"ca_certs": str(tls.ca)},
        ssl_context_factory=ssl.create_default_context,
    ) as client:  # fmt: skip
        assert client.is_server_ready()  # health: no key
        with pytest.raises(InferenceServerException, match="needs a key"):
            client.get_model_metadata("cifar10")
        inp = thttp.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer("cifar10", [inp], headers={"x-api-key": INFER_KEY}).as_numpy("probabilities")
        assert out.shape == (1, 10)
    with tgrpc.InferenceServerClient(server.grpc_target, ssl=True, root_certificates=str(tls.ca)) as client:
        assert client.is_server_ready()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.get_model_metadata("cifar10")
        inp = tgrpc.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("cifar10", [inp], headers={"authorization": f"Bearer {INFER_KEY}"})
        assert result.as_numpy("probabilities").shape == (1, 10)


def _classify(server, tls, *args: str, key: str | None) -> subprocess.CompletedProcess:
    image = tls.dir / "image.png"
    image.write_bytes(IMAGE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CNNSERVE_ACCESS_KEY", None)
    if key:
        env["CNNSERVE_ACCESS_KEY"] = key
    cmd = [sys.executable, "-m", "service.cli", "classify", str(image), "--cacert", str(tls.ca), "--json", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)


def test_classify_client_speaks_tls_and_keys_on_both_protocols(server, tls):
    for target in (["--target", server.grpc_target], ["--http", "--target", server.http_address]):
        ok = _classify(server, tls, *target, key=INFER_KEY)
        assert ok.returncode == 0, ok.stderr
        assert '"model": "cifar10"' in ok.stdout
        refused = _classify(server, tls, *target, key=None)
        assert refused.returncode == 1
        assert "UNAUTHENTICATED: the inference API needs a key" in refused.stderr or (
            "HTTP 401: the inference API needs a key" in refused.stderr
        ), refused.stderr


def test_refusals_are_counted_by_protocol_group_and_reason(https, channel):
    def denied() -> dict:
        text = https.get("/metrics", headers={"X-API-Key": ADMIN_KEY}).text
        return {
            (s.labels["protocol"], s.labels["group"], s.labels["reason"]): s.value
            for f in text_string_to_metric_families(text)
            if f.name == "cnnserve_access_denied"
            for s in f.samples
            if s.name.endswith("_total")
        }

    before = denied()
    _http(https, "statistics", {})
    _http(https, "statistics", {"X-API-Key": INFER_KEY})
    _code(_grpc_calls(channel)["statistics"][0], (("x-api-key", WRONG_KEY),))
    after = denied()
    for label in (("http", "statistics", "missing_key"), ("http", "statistics", "forbidden"),
                  ("grpc", "statistics", "invalid_key")):  # fmt: skip
        assert after[label] - before.get(label, 0) == 1, label


@pytest.mark.parametrize("target", ["grpc", "grpc-v2", "http", "http-v2"])
def test_loadtest_speaks_tls_and_keys_and_scrapes_metrics_over_https(
    server, tls, tmp_path, monkeypatch, capsys, target
):
    import json

    from service import cli

    key_file = tmp_path / "key"
    key_file.write_text(ADMIN_KEY + "\n")  # inference for the run, metrics for the scrape
    monkeypatch.delenv("CNNSERVE_ACCESS_KEY", raising=False)
    address = server.grpc_target if target.startswith("grpc") else server.http_address
    report = tmp_path / "run.json"
    argv = ["loadtest", "--quiet", "--model-file", str(MODEL_PATH), "--target", target, "--address", address,
            "--metrics-address", server.http_address, "--requests", "8", "--warmup", "0", "--cacert", str(tls.ca),
            "--access-key-file", str(key_file), "--json", str(report), "--fail-on-error"]  # fmt: skip
    assert cli.main(argv) == 0
    doc = json.loads(report.read_text())
    assert doc["summary"]["ok"] == 8 and doc["summary"]["errors"] == 0
    assert doc["server_scrape_error"] is None and doc["server"] is not None
    # Without the key the probe request is refused, and the run says why before measuring anything.
    capsys.readouterr()
    assert cli.main([a for a in argv if a not in ("--access-key-file", str(key_file))]) == 2
    assert "the inference API needs a key" in capsys.readouterr().err


def test_bad_security_settings_stop_the_server_with_one_clear_line(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("inference:tiny-k3y\n")
    base = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--http-port", "0",
            "--grpc-port", "0", "--providers", "cpu"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "CNNSERVE_ACCESS_KEYS"}
    for args, message in (
        (["--restricted-apis", "admin"], "--restricted-apis admin (environment variable CNNSERVE_RESTRICTED_APIS): "
         "unknown access group 'admin'"),
        (["--restricted-apis", "inference"], "--restricted-apis inference needs at least one key"),
        (["--restricted-apis", "inference", "--access-keys-file", str(keys)], "line 1: a key is shorter than 16"),
        (["--access-keys-file", str(tmp_path / "absent")], "cannot read --access-keys-file"),
    ):  # fmt: skip
        out = subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert "tiny-k3y" not in out.stderr


@pytest.mark.skipif(shutil.which("grpcurl") is None, reason="grpcurl is not installed (not packaged for this OS)")
def test_grpcurl_lists_services_over_tls_with_a_key_and_is_refused_without(server, tls):
    base = ["grpcurl", "-cacert", str(tls.ca), "-max-time", "20"]
    ok = subprocess.run([*base, "-H", f"x-api-key: {ADMIN_KEY}", server.grpc_target, "list"],
                        capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "cnnserve.v1.Classifier" in ok.stdout, ok.stderr
    refused = subprocess.run([*base, server.grpc_target, "list"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr


def test_a_request_without_a_key_is_refused_before_its_body_is_read(server, tls):
    """Headers announcing 10 MB and no body: the 401 comes at once, so an unauthenticated client
    cannot make the server receive (or buffer) anything."""
    import socket

    ctx = ssl.create_default_context(cafile=str(tls.ca))
    with (
        socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 10000000\r\n\r\n")
        answer = b""
        while b"}" not in answer:  # head and JSON body may come in separate TLS records
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert b"the inference API needs a key" in answer
