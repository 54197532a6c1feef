"""OpenTelemetry tracing (README "Tracing"), end to end: a real server exporting to a real OTLP
receiver process (tests/otlp_receiver.py, built on opentelemetry-proto's messages), real HTTP and
gRPC clients that send a parent context, and the spans read back from the receiver."""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until

pytest.importorskip("opentelemetry.sdk", reason="tracing needs the tracing extra (pip install .[tracing])")
pytest.importorskip("opentelemetry.proto", reason="the test receiver needs opentelemetry-proto")

ROOT = Path(__file__).resolve().parent.parent
SERVER, INTERNAL = 2, 1  # OTLP span kinds


class Receiver:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        fields = dict(part.split("=") for part in line.split()[1:])
        self.http, self.grpc = int(fields["http"]), int(fields["grpc"])

    def spans(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/spans", timeout=5) as r:
            return json.load(r)

    def trace(self, trace_id: str) -> list[dict[str, Any]]:
        return [s for s in self.spans() if s["trace_id"] == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout: float = 20) -> list[dict[str, Any]]:
        """The trace's spans once every name in ``names`` is among them; a name that never comes fails
        here, naming what came, rather than costing the whole timeout before a later check."""
        until = time.monotonic() + timeout
        while True:
            spans = self.trace(trace_id)
            came = {s["name"] for s in spans}
            if names <= came:
                return spans
            assert time.monotonic() < until, f"spans {sorted(names - came)} never came; these did: {sorted(came)}"
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def _parent() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_hex(8)


def _server_span(spans: list[dict], parent: str) -> dict:
    servers = [s for s in spans if s["kind"] == SERVER]
    assert len(servers) == 1, spans
    assert servers[0]["parent_span_id"] == parent  # the client's span is its parent
    return servers[0]


def _check_request(spans: list[dict], parent: str, stages: set[str], compute_process: str) -> dict:
    """One request's trace: the server span under the client's, its stage spans under it, and the
    compute span that served it, in the process that ran the model."""
    server = _server_span(spans, parent)
    by_name = {s["name"]: s for s in spans}
    for name in stages:
        assert by_name[name]["parent_span_id"] == server["span_id"], (name, spans)
    compute = by_name["compute"]
    assert compute["resource"]["cnnserve.process"] == compute_process
    assert [compute["trace_id"], server["span_id"]] in compute["links"]
    assert compute["attributes"]["cnnserve.batch.size"] >= 1
    assert by_name["queue"]["attributes"]["cnnserve.batch.share"] > 0
    attributes = server["attributes"]
    assert attributes["cnnserve.model"] == "cifar10" and attributes["cnnserve.images"] == 1
    assert attributes["cnnserve.provider"] == "CPUExecutionProvider" and attributes["cnnserve.precision"] == "fp32"
    assert {"admitted", "computed"} <= set(server["events"])
    return server


def test_http_and_grpc_across_front_ends_and_the_executor(receiver: Receiver) -> None:
    """Two front ends and a device executor; the sampler's ratio is 0, so only requests whose
    client sent a sampled parent are traced, and each must be whole in the receiver."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.http}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    s = ServerProcess("--workers", "2", "--executor", "device", "--drain-seconds", "0", "--tracing", env=env)
    try:
        image = png_bytes(distinct_images(1)[0])
        http_traces = []
        # New connections each time: the kernel spreads them over both front ends.
        for i in range(16):
            trace_id, parent = _parent()
            headers = {"Content-Type": "image/png", "Connection": "close", "traceparent": f"00-{trace_id}-{parent}-01"}
            if i == 0:
                headers["X-Request-Id"] = "req-0"
            assert httpx.post(f"{s.http}/predict", content=image, headers=headers).status_code == 200
            http_traces.append((trace_id, parent))
        grpc_trace, grpc_parent = _parent()
        with grpc.insecure_channel(s.grpc_target) as channel:
            reply = pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(encoded=image)]),
                metadata=(("traceparent", f"00-{grpc_trace}-{grpc_parent}-01"),),
                timeout=10,
            )
        assert reply.results[0].predictions
        unsampled, unsampled_parent = _parent()
        headers = {"Content-Type": "image/png", "traceparent": f"00-{unsampled}-{unsampled_parent}-00"}
        assert httpx.post(f"{s.http}/predict", content=image, headers=headers).status_code == 200
        assert httpx.post(f"{s.http}/predict", content=image, headers={"Content-Type": "image/png"}).status_code == 200
        probes, probes_parent = _parent()  # a sampled parent: only the route keeps these untraced
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready", "/v2/models/cifar10"):
            httpx.get(f"{s.http}{path}", headers={"traceparent": f"00-{probes}-{probes_parent}-01"})

        front_ends = set()
        for n, (trace_id, parent) in enumerate(http_traces):
            spans = receiver.wait_for(trace_id, {"POST /predict", "read body", "decode", "queue", "compute", "answer"})
            server = _check_request(spans, parent, {"read body", "decode", "answer"}, "executor-0")
            assert server["name"] == "POST /predict" and server["attributes"]["http.response.status_code"] == 200
            assert server["attributes"].get("cnnserve.request_id") == ("req-0" if n == 0 else None)
            front_ends.add(server["resource"]["cnnserve.process"])
        assert front_ends == {"frontend-0", "frontend-1"}
        spans = receiver.wait_for(grpc_trace, {"Classify", "decode", "queue", "compute", "answer"})
        server = _check_request(spans, grpc_parent, {"decode", "answer"}, "executor-0")
        assert server["name"] == "Classify" and server["attributes"]["rpc.grpc.status_code"] == 0
        assert {sp["resource"]["service.name"] for sp in spans} == {"cnnserve"}

        time.sleep(0.5)  # a span of a request that should not be traced would have come by now
        seen = receiver.spans()
        assert not [sp for sp in seen if sp["trace_id"] in (unsampled, probes)]
        traced = {t for t, _ in http_traces} | {grpc_trace}
        assert not [sp for sp in seen if sp["trace_id"] not in traced]  # ratio 0, no health/metrics spans
        metrics = httpx.get(f"{s.http}/metrics").text
        assert 'cnnserve_trace_spans_dropped_total{reason="queue_full"}' not in metrics
    finally:
        assert s.stop() == 0, s.log


def _large_png() -> bytes:
    """A PNG too large to decode on the event loop (core.INLINE_DECODE_*): decoded in the pool."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_one_process_otlp_grpc_b3_and_trace_ids_in_logs(receiver: Receiver) -> None:
    """One process (in-process batcher), OTLP over gRPC, a B3 parent as a mesh sends it, and the
    request's log lines carrying its trace id."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.grpc}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0", "--tracing",
                      "--log-level", "DEBUG", env=env)  # fmt: skip
    try:
        trace_id, parent = _parent()
        headers = {"Content-Type": "image/png", "X-B3-TraceId": trace_id, "X-B3-SpanId": parent, "X-B3-Sampled": "1"}
        assert httpx.post(f"{s.http}/predict", content=_large_png(), headers=headers).status_code == 200
        spans = receiver.wait_for(trace_id, {"POST /predict", "read body", "decode", "queue", "compute", "answer"})
        _check_request(spans, parent, {"read body", "decode", "answer"}, "server")
        assert {sp["transport"] for sp in spans} == {"grpc"}
        pooled = [line for line in s.lines if "decoding 1 images in the pool" in line]
        assert pooled and pooled[0].rstrip().endswith(f" trace_id={trace_id}"), pooled

        # An Open Inference Protocol request (its own id on the span) and an explanation.
        v2_trace, v2_parent = _parent()
        body = {"id": "v2-req-7", "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                              "data": [0.0] * 3072}]}  # fmt: skip
        r = httpx.post(f"{s.http}/v2/models/cifar10/infer", json=body,
                       headers={"traceparent": f"00-{v2_trace}-{v2_parent}-01"})  # fmt: skip
        assert r.status_code == 200, r.text
        spans = receiver.wait_for(v2_trace, {"POST /v2/models/{name}/infer", "queue", "compute", "answer"})
        server = _server_span(spans, v2_parent)
        assert server["attributes"]["cnnserve.request_id"] == "v2-req-7"
        explain_trace, explain_parent = _parent()
        headers = {"Content-Type": "image/png", "traceparent": f"00-{explain_trace}-{explain_parent}-01"}
        r = httpx.post(f"{s.http}/explain", content=png_bytes(distinct_images(1)[0]), headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        spans = receiver.wait_for(explain_trace, {"POST /explain", "decode", "queue", "compute"})
        assert _server_span(spans, explain_parent)["name"] == "POST /explain"
        assert {"decode", "queue", "compute"} <= {sp["name"] for sp in spans}

        # Refused requests: the status on the span. HTTP with W3C, gRPC with B3 in its metadata.
        bad_http, bad_http_parent = _parent()
        headers = {"Content-Type": "image/png", "traceparent": f"00-{bad_http}-{bad_http_parent}-01"}
        assert httpx.post(f"{s.http}/predict", content=b"not an image", headers=headers).status_code == 400
        bad_grpc, bad_grpc_parent = _parent()
        with grpc.insecure_channel(s.grpc_target) as channel, pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[pb.Image(encoded=b"not an image")]),
                metadata=(("b3", f"{bad_grpc}-{bad_grpc_parent}-1"),),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        http_span = _server_span(receiver.wait_for(bad_http, {"POST /predict"}), bad_http_parent)
        assert http_span["attributes"]["http.response.status_code"] == 400
        assert http_span["attributes"]["error.type"] == "invalid"
        grpc_span = _server_span(receiver.wait_for(bad_grpc, {"Classify"}), bad_grpc_parent)
        assert grpc_span["attributes"]["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    finally:
        assert s.stop() == 0, s.log


def _dropped(metrics: str, reason: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'cnnserve_trace_spans_dropped_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_collector_that_never_answers_fails_no_request_and_drops_are_counted() -> None:
    """The collector accepts connections and never answers (the worst kind of broken): every
    request is still answered, and the spans that do not fit the bounded queue are counted."""
    blackhole = socket.create_server(("127.0.0.1", 0), backlog=64)  # listens, never accepts
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{blackhole.getsockname()[1]}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2",
        "OTEL_TRACES_SAMPLER_ARG": "1",
        "OTEL_BSP_MAX_QUEUE_SIZE": "8",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0", "--tracing", env=env)
    try:
        image = png_bytes(distinct_images(1)[0])
        with httpx.Client() as client:
            for _ in range(30):
                r = client.post(f"{s.http}/predict", content=image, headers={"Content-Type": "image/png"})
                assert r.status_code == 200
            metrics = client.get(f"{s.http}/metrics").text
        assert _dropped(metrics, "queue_full") > 0, metrics
    finally:
        assert s.stop() == 0, s.log
        blackhole.close()


def test_json_log_lines_of_a_traced_request_carry_its_ids() -> None:
    """--log-format json: a traced request's lines have trace_id and span_id fields, others none.
    No collector is needed for that (OTEL_TRACES_EXPORTER=none)."""
    env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_TRACES_SAMPLER_ARG": "0"}
    s = ServerProcess("--workers", "1", "--executor", "worker", "--drain-seconds", "0", "--tracing",
                      "--log-level", "DEBUG", "--log-format", "json", env=env, wait_ready=False)  # fmt: skip
    try:
        # The harness spots readiness in text logs only: ask /readyz instead.
        assert wait_until(lambda: httpx.get(f"{s.http}/readyz").status_code == 200, timeout=60), s.log
        trace_id, parent = _parent()
        headers = {"Content-Type": "image/png", "traceparent": f"00-{trace_id}-{parent}-01"}
        assert httpx.post(f"{s.http}/predict", content=_large_png(), headers=headers).status_code == 200
        assert wait_until(lambda: any("decoding 1 images in the pool" in line for line in s.lines)), s.log
        docs = [json.loads(line) for line in s.lines if line.startswith("{")]
        pooled = next(d for d in docs if d["message"].startswith("decoding 1 images in the pool"))
        assert pooled["trace_id"] == trace_id and len(pooled["span_id"]) == 16
        assert not [d for d in docs if "listening" in d["message"] and "trace_id" in d]
    finally:
        assert s.stop() == 0, s.log
