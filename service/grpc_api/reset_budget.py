"""A budget of early resets per gRPC connection: past it, the connection is shut down.

HTTP/2 rapid reset (CVE-2023-44487): a client opens a stream and cancels it at once, thousands of
times a second, on one connection. grpc-core bounds the streams held at once
(``grpc.max_concurrent_streams`` with overload protection: service/grpc_api/http2_limits.py)
but has no budget of resets after which it closes the connection (nghttp2, Envoy and Node.js
have one), so each reset still costs this process a call: a short Python task. A unary client
sends its message with its headers and has no reason to cancel before the server has read it;
past ``limit`` such cancels from one address within ``window`` seconds, each connection from it
that cancels early again is shut down here.

grpcio has no call to close one connection, so the socket is found among this process's own
descriptors by its two addresses (only when a budget is spent: a scan of /proc/self/fd) and shut
down (``shutdown(2)`` on a duplicate): grpc-core sees the connection end and drops every stream on
it; the client sees UNAVAILABLE and reconnects. No GOAWAY is sent (grpc-core offers no way to
send one for a single connection); the Envoy sidecar overlay sends one where that matters.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Any

log = logging.getLogger("cnnserve.grpc")


def parse_peer(peer: str) -> tuple[str, int] | None:
    """grpc's peer string (``ipv4:127.0.0.1:5555``, ``ipv6:[::1]:5555``) → (host, port)."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isascii() or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _plain(address: tuple[Any, ...]) -> tuple[str, int]:
    """grpc-core listens on dual-stack IPv6 sockets: an IPv4 peer shows as ``::ffff:a.b.c.d``."""
    host = address[0]
    return (host[7:] if host.startswith("::ffff:") else host), address[1]


def shutdown_connection(local_port: int, peer: tuple[str, int]) -> bool:
    """Shut down this process's TCP socket from ``local_port`` to ``peer``; False if none is found."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for name in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile, or the listing's own descriptor
        try:
            sock = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        try:
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockname()[1] == local_port
                and _plain(sock.getpeername()) == peer
            ):
                sock.shutdown(socket.SHUT_RDWR)
                return True
        except OSError:
            pass
        finally:
            sock.close()  # closes the duplicate only
    return False


class ResetBudget:
    """Counts calls cancelled before their message arrived, per client address, in fixed windows.
    Past ``limit`` in a window, the connection of each further early reset from that address is
    shut down, each once: an attacker who reconnects loses every new connection at its first
    reset instead of after ``limit`` more, while a connection that never resets early, even from
    the same address (a NAT, a sidecar), is never touched."""

    def __init__(self, limit: int, window: float = 10.0) -> None:
        self.limit = limit
        self.window = window
        self.local_port = 0  # set once the server has bound its port
        self.counts: dict[str, int] = {}
        self.shut: set[str] = set()  # connections (peer strings) shut down in this window
        self.window_started = time.monotonic()
        self.closed = 0  # connections shut down, for logs

    def note(self, peer: str) -> None:
        now = time.monotonic()
        if now - self.window_started > self.window:
            self.counts.clear()  # also forgets clients long gone
            self.shut.clear()
            self.window_started = now
        address = parse_peer(peer)
        if address is None:
            return
        count = self.counts.get(address[0], 0) + 1
        self.counts[address[0]] = count
        if count <= self.limit or peer in self.shut or not self.local_port:
            return
        self.shut.add(peer)
        if shutdown_connection(self.local_port, address):
            self.closed += 1
            if count == self.limit + 1 or self.closed % 100 == 0:
                log.warning(
                    "gRPC connection from %s closed: more than %d calls from %s cancelled before their "
                    "message within %g s (HTTP/2 rapid reset); %d connections closed",
                    peer,
                    self.limit,
                    address[0],
                    self.window,
                    self.closed,
                )
