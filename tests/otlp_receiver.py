"""A small OTLP receiver for the tracing tests, run as its own process: ``python -m
tests.otlp_receiver``. It accepts spans over OTLP/HTTP (``POST /v1/traces``, protobuf) and OTLP/gRPC
(``TraceService/Export``), decoded with the official protobufs (opentelemetry-proto), and answers
``GET /spans`` with every span received so far as JSON. It prints
``listening http=PORT grpc=PORT`` once both listen on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

SPANS: list[dict[str, Any]] = []
LOCK = threading.Lock()


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def _attributes(attributes: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in attributes}


def _collect(request: trace_service_pb2.ExportTraceServiceRequest, transport: str) -> None:
    found = []
    for rs in request.resource_spans:
        resource = _attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                found.append({
                    "transport": transport,
                    "resource": resource,
                    "trace_id": s.trace_id.hex(),
                    "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "name": s.name,
                    "kind": s.kind,
                    "start": s.start_time_unix_nano,
                    "end": s.end_time_unix_nano,
                    "attributes": _attributes(s.attributes),
                    "events": [e.name for e in s.events],
                    "links": [[link.trace_id.hex(), link.span_id.hex()] for link in s.links],
                })  # fmt: skip
    with LOCK:
        SPANS.extend(found)


class _Http(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        _collect(trace_service_pb2.ExportTraceServiceRequest.FromString(body), "http")
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def do_GET(self) -> None:
        with LOCK:
            reply = json.dumps(SPANS).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *_: Any) -> None:  # quiet: the test reads stdout for the ports
        pass


class _Grpc(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        _collect(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Grpc(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    print(f"listening http={http.server_address[1]} grpc={grpc_port}", flush=True)
    try:
        http.serve_forever()
    finally:
        server.stop(0)


if __name__ == "__main__":
    sys.exit(main())
