"""Measured floors: what each transport costs with nothing behind it.

    .venv/bin/python bench/floors.py --rounds 3 --duration 3

The same trivial handler (it takes the request's bytes and returns a small fixed answer shaped
like a one-image /predict or Classify answer) is served on each transport below and driven by the
same client as ``bench/compare_revisions.py`` (``cnnserve loadtest``: the raw httptools client for
HTTP /predict, grpc.aio with pass-through serialisers for Classify) at 64 concurrent callers. Each
server is one process (granian: its worker processes are counted too); its CPU (user + system,
/proc/PID/stat) over the requests it answered (counted by the handler) is its core-ms per request.
The servers are measured in interleaved rounds (the order flips every round); min / median.

Servers (``--servers`` picks some):

- ``uvicorn``: uvicorn, httptools parser, uvloop, a bare ASGI app (cnnserve's HTTP front end).
- ``granian-asgi`` / ``granian-rsgi``: granian (Rust HTTP server), one worker, one runtime
  thread, uvloop, HTTP/1; the ASGI app above and the same handler on its RSGI interface.
- ``grpc-aio``: grpc.aio, a unary-unary generic handler, bytes in and out.
- ``grpc-aio-streamed``: grpc.aio, the same method served as client-streaming with one
  ``context.read()``: how cnnserve serves its unary methods (service/grpc_api/instrumented.py).
- ``grpc-aio-throughput``: grpc.aio unary with ``grpc.optimization_target=throughput``.
- ``grpc-sync``: grpc's threaded server (``--sync-threads`` threads), unary-unary.
- ``grpclib``: grpclib (pure-Python gRPC on h2, ``pip install grpclib``), uvloop, bytes in and out.

Every gRPC server runs with compression off and ``grpc.so_reuseport=0``.
granian and grpclib are not cnnserve dependencies: ``.venv/bin/pip install granian grpclib`` first,
or leave their servers out with ``--servers``.
Writes bench/results/floors.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serverproc import cpu_seconds  # noqa: E402

SERVERS = (
    "uvicorn",
    "granian-asgi",
    "granian-rsgi",
    "grpc-aio",
    "grpc-aio-streamed",
    "grpc-aio-throughput",
    "grpc-sync",
    "grpclib",
)
CLASSIFY_METHOD = "/cnnserve.v1.Classifier/Classify"
SERVED_METHOD = "/floors.Floor/Served"
HTTP_ANSWER = (
    b'{"model":"floor","model_version":"1","results":[{"predictions":[{"label":"cat","index":3,"probability":0.9}]}]}'
)
HTTP_HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(HTTP_ANSWER)).encode())]


def grpc_answer() -> bytes:
    from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb

    prediction = pb.Prediction(label="cat", index=3, probability=0.9)
    return pb.ClassifyResponse(
        model="floor", model_version="1", results=[pb.Classification(predictions=[prediction])]
    ).SerializeToString()


# ---- the HTTP handler: ASGI and RSGI ----------------------------------------------------------
served = 0


async def asgi_app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    global served
    if scope["type"] != "http":
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] == "GET":  # GET /served: the count, for the benchmark
        body = str(served).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    served += 1
    await send({"type": "http.response.start", "status": 200, "headers": HTTP_HEADERS})
    await send({"type": "http.response.body", "body": HTTP_ANSWER})


class RsgiApp:
    async def __rsgi__(self, scope, protocol) -> None:  # type: ignore[no-untyped-def]
        global served
        if scope.method == "GET":
            protocol.response_bytes(200, [], str(served).encode())
            return
        await protocol()
        served += 1
        protocol.response_bytes(200, [("content-type", "application/json")], HTTP_ANSWER)


rsgi_app = RsgiApp()


# ---- the gRPC handlers ------------------------------------------------------------------------
GRPC_OPTIONS = [("grpc.so_reuseport", 0), ("grpc.per_message_decompression", 0)]


def _grpc_handlers(kind: str):  # type: ignore[no-untyped-def]
    import grpc

    answer = grpc_answer()
    count = [0]

    if kind == "grpc-sync":

        def unary(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            count[0] += 1  # approximate under threads: a lost increment in thousands does not show
            return answer

        def report(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            return str(count[0]).encode()

        classify = grpc.unary_unary_rpc_method_handler(unary)
    elif kind == "grpc-aio-streamed":

        async def streamed(request_iterator, context) -> bytes:  # type: ignore[no-untyped-def]
            await context.read()
            count[0] += 1
            return answer

        async def report(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            return str(count[0]).encode()

        classify = grpc.stream_unary_rpc_method_handler(streamed)
    else:

        async def unary(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            count[0] += 1
            return answer

        async def report(request: bytes, context) -> bytes:  # type: ignore[no-untyped-def]
            return str(count[0]).encode()

        classify = grpc.unary_unary_rpc_method_handler(unary)
    return {CLASSIFY_METHOD: classify, SERVED_METHOD: grpc.unary_unary_rpc_method_handler(report)}


def serve_grpc(kind: str, port: int, sync_threads: int) -> None:
    import grpc

    handlers = _grpc_handlers(kind)

    class Generic(grpc.GenericRpcHandler):
        def service(self, details):  # type: ignore[no-untyped-def]
            return handlers.get(details.method)

    options = list(GRPC_OPTIONS)
    if kind == "grpc-aio-throughput":
        options.append(("grpc.optimization_target", "throughput"))
    if kind == "grpc-sync":
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(max_workers=sync_threads), options=options)
        server.add_generic_rpc_handlers((Generic(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        print("listening", flush=True)
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((Generic(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("listening", flush=True)
        await server.wait_for_termination()

    import uvloop  # grpc.aio runs its own poller; uvloop as cnnserve runs it

    uvloop.run(main())


def serve_grpclib(port: int) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.encoding.proto import ProtoCodec
    from grpclib.server import Server

    answer, count = grpc_answer(), [0]

    class RawCodec(ProtoCodec):  # bytes in and out, as the other servers' handlers
        def encode(self, message, message_type):  # type: ignore[no-untyped-def]
            return message

        def decode(self, data, message_type):  # type: ignore[no-untyped-def]
            return data

    class Floor:
        async def classify(self, stream) -> None:  # type: ignore[no-untyped-def]
            await stream.recv_message()
            count[0] += 1
            await stream.send_message(answer)

        async def served(self, stream) -> None:  # type: ignore[no-untyped-def]
            await stream.recv_message()
            await stream.send_message(str(count[0]).encode())

        def __mapping__(self):  # type: ignore[no-untyped-def]
            return {
                CLASSIFY_METHOD: Handler(self.classify, Cardinality.UNARY_UNARY, bytes, bytes),
                SERVED_METHOD: Handler(self.served, Cardinality.UNARY_UNARY, bytes, bytes),
            }

    async def main() -> None:
        server = Server([Floor()], codec=RawCodec())
        await server.start("127.0.0.1", port)
        print("listening", flush=True)
        await server.wait_closed()

    import uvloop

    uvloop.run(main())


def serve(kind: str, port: int, sync_threads: int) -> None:
    if kind == "uvicorn":
        import uvicorn

        print("listening", flush=True)
        options = {"loop": "uvloop", "http": "httptools", "log_level": "warning", "access_log": False}
        uvicorn.run(asgi_app, host="127.0.0.1", port=port, **options)
    elif kind == "grpclib":
        serve_grpclib(port)
    else:
        serve_grpc(kind, port, sync_threads)


# ---- the driver ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and every process below it (granian's workers)."""
    total, pending = 0.0, [pid]
    while pending:
        p = pending.pop()
        total += cpu_seconds(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                pending += [int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return total


class FloorServer:
    def __init__(self, kind: str, sync_threads: int) -> None:
        self.kind, self.port = kind, free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if kind.startswith("granian"):
            interface = kind.split("-")[1]
            cmd = [
                str(Path(sys.executable).parent / "granian"),
                *("--interface", interface, "--host", "127.0.0.1", "--port", str(self.port)),
                *("--workers", "1", "--runtime-threads", "1", "--loop", "uvloop", "--http", "1"),
                *("--no-access-log", "--log-level", "warning"),
                f"bench.floors:{interface}_app",
            ]
        else:
            cmd = [sys.executable, __file__, "--serve", kind, "--port", str(self.port)]
            cmd += ["--sync-threads", str(sync_threads)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.served()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} did not start") from None
                time.sleep(0.1)

    @property
    def target(self) -> str:
        return "grpc" if self.kind.startswith("grpc") else "http"  # grpclib too

    def served(self) -> int:
        if self.target == "http":
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/served", timeout=5) as r:
                return int(r.read())
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            return int(channel.unary_unary(SERVED_METHOD)(b"", timeout=5))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated, of {', '.join(SERVERS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sync-threads", type=int, default=16, help="grpc-sync's thread pool")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "floors.json"))
    ap.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # a server process of this script
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.sync_threads)
        return 0

    from loadtest.config import LoadConfig
    from loadtest.machine import machine_info, spread
    from loadtest.runner import run

    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = set(kinds) - set(SERVERS)
    if unknown:
        ap.error(f"unknown servers: {', '.join(sorted(unknown))}")
    results: dict[str, dict[str, list[float]]] = {k: {"core-ms/req": [], "req/s": []} for k in kinds}
    servers: list[FloorServer] = []
    try:
        servers = [FloorServer(k, args.sync_threads) for k in kinds]
        for rnd in range(args.rounds):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                before_n, before_cpu = server.served(), tree_cpu(server.proc.pid)
                report = run(
                    LoadConfig(
                        target=server.target,
                        address=f"127.0.0.1:{server.port}",
                        concurrency=args.concurrency,
                        duration=args.duration,
                        warmup=0.5,
                        metrics_address="none",
                        progress=False,
                    )
                )["summary"]
                cpu = tree_cpu(server.proc.pid) - before_cpu
                n = max(server.served() - before_n, 1)
                results[server.kind]["core-ms/req"].append(1000 * cpu / n)
                results[server.kind]["req/s"].append(report["img_per_s"])
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for server in servers:
            server.stop()
    summary = {k: {m: spread(v) for m, v in per.items()} for k, per in results.items()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"machine": machine_info(), "concurrency": args.concurrency, "rounds": args.rounds, "results": summary},
            indent=1,
        )
        + "\n"
    )
    print(f"{'server':<22}{'core-ms/req min / median':>28}{'req/s min / median':>24}")
    for kind, per in summary.items():
        c, r = per["core-ms/req"], per["req/s"]
        print(f"{kind:<22}{c['min']:>16.3f} /{c['median']:>9.3f}{r['min']:>14.0f} /{r['median']:>8.0f}")
    print(f"({args.concurrency} callers, {args.rounds} rounds of {args.duration:g} s)  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
