"""Mutual TLS (a missing or foreign client certificate refused in the handshake, on both ports) and
certificate rotation without a restart, with two front ends sharing the ports."""

from __future__ import annotations

import ssl
import subprocess
import sys
import time

import grpc
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.certs import handshake, make_tls
from tests.conftest import MODEL_PATH, ROOT, ServerProcess

pytestmark = pytest.mark.skipif(not MODEL_PATH.is_file(), reason="bundled model models/cifar10/1/model.onnx missing")


def _curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *args],
                          capture_output=True, text=True, timeout=30)  # fmt: skip


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def mutual(tls):
    s = ServerProcess(
        "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key), "--tls-client-ca-file", str(tls.ca),
        "--drain-seconds", "0",
    )  # fmt: skip
    yield s
    assert s.stop() == 0, s.log


def test_mutual_tls_on_http_needs_a_client_certificate_from_the_ca(mutual, tls):
    url = f"https://127.0.0.1:{mutual.http_port}/readyz"
    ok = _curl("--cacert", str(tls.ca), "--cert", str(tls.client_cert), "--key", str(tls.client_key), url)
    assert ok.stdout == "200", ok.stderr
    wrong = ("--cert", str(tls.wrong_client_cert), "--key", str(tls.wrong_client_key))
    for client_cert in ((), wrong):
        # TLS 1.2: the server checks the client's certificate before its Finished message, so the
        # client's handshake itself fails (curl's exit status 35).
        refused = _curl("--cacert", str(tls.ca), "--tls-max", "1.2", *client_cert, url)
        assert refused.returncode == 35 and refused.stdout == "000", refused
        # TLS 1.3: the client has finished its side when the server checks; the server closes the
        # connection without reading a request, so no HTTP status at all.
        refused = _curl("--cacert", str(tls.ca), "--tlsv1.3", *client_cert, url)
        assert refused.returncode != 0 and refused.stdout == "000", refused
    with thttp.InferenceServerClient(
        mutual.http_address, ssl=True, ssl_context_factory=ssl.create_default_context,
        ssl_options={"ca_certs": str(tls.ca), "certfile": str(tls.client_cert), "keyfile": str(tls.client_key)},
    ) as client:  # fmt: skip
        assert client.is_server_ready()
        assert client.get_model_metadata("cifar10")["name"] == "cifar10"


def test_mutual_tls_on_grpc_needs_a_client_certificate_from_the_ca(mutual, tls):
    with tgrpc.InferenceServerClient(
        mutual.grpc_target, ssl=True, root_certificates=str(tls.ca),
        private_key=str(tls.client_key), certificate_chain=str(tls.client_cert),
    ) as client:  # fmt: skip
        assert client.is_server_ready()
        assert client.get_model_metadata("cifar10").name == "cifar10"
    for key, cert in ((None, None), (tls.wrong_client_key, tls.wrong_client_cert)):
        creds = grpc.ssl_channel_credentials(
            tls.ca.read_bytes(), key.read_bytes() if key else None, cert.read_bytes() if cert else None
        )
        with grpc.secure_channel(mutual.grpc_target, creds) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10)
            # The connection never came up: grpc reports the failed handshake as UNAVAILABLE.
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    with (
        tgrpc.InferenceServerClient(mutual.grpc_target, ssl=True, root_certificates=str(tls.ca)) as client,
        pytest.raises(InferenceServerException, match="UNAVAILABLE"),
    ):
        client.is_server_live(client_timeout=10)


def test_a_server_that_cannot_use_its_tls_files_says_so_and_exits(tls, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    for args, message in (
        (("--tls-cert-file", str(tls.cert)), "--tls-cert-file and --tls-key-file go together"),
        (("--tls-cert-file", str(bad), "--tls-key-file", str(tls.key)), "not a PEM certificate chain"),
        (("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.client_key)), "matching private key"),
        (("--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key), "--tls-client-ca-file", str(bad)),
         "no PEM CA certificates"),
    ):  # fmt: skip
        command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--http-port", "0",
                   "--grpc-port", "0", "--providers", "cpu", *args]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def _served(port: int, tls, alpn: str) -> bytes:
    return handshake(port, tls.ca, alpn)[0]


def test_rotated_certificate_is_served_without_a_restart_by_every_front_end(tmp_path):
    tls = make_tls(tmp_path / "tls")
    s = ServerProcess(
        "--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key), "--tls-reload-seconds", "0.2",
        "--workers", "2", "--executor", "worker", "--drain-seconds", "0",
    )  # fmt: skip
    try:
        first = _served(s.http_port, tls, "http/1.1")
        assert _served(s.grpc_port, tls, "h2") == first
        # A gRPC connection made before the rotation keeps working after it.
        channel = grpc.secure_channel(s.grpc_target, grpc.ssl_channel_credentials(tls.ca.read_bytes()))
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live

        # A half-written pair (a key that does not match) is not taken: the old certificate stays.
        new_cert, new_key = tls.issue_server("server-2")
        tls.replace_server(new_cert, tls.client_key.read_bytes())
        deadline = time.monotonic() + 20
        while "cannot be used yet" not in s.log and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "cannot be used yet" in s.log, s.log
        assert {_served(s.http_port, tls, "http/1.1") for _ in range(6)} == {first}

        tls.replace_server(new_cert, new_key)
        deadline = time.monotonic() + 20
        while True:
            # Several new connections on each port, so that both front ends answer some (SO_REUSEPORT).
            served = {_served(port, tls, alpn) for _ in range(8) for port, alpn in
                      ((s.http_port, "http/1.1"), (s.grpc_port, "h2"))}  # fmt: skip
            if first not in served or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(served) == 1 and first not in served, "the old certificate is still served"
        assert ssl.DER_cert_to_PEM_cert(served.pop()).encode() in new_cert
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=10).live  # same connection
        channel.close()
        assert s.log.count("TLS certificate reloaded") == 2, s.log  # once per front end
    finally:
        assert s.stop() == 0, s.log
