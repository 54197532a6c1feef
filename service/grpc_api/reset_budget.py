"""A budget of early resets per client address: past it, the address goes in the penalty box.

HTTP/2 rapid reset (CVE-2023-44487): a client opens a stream and cancels it at once, thousands of
times a second. grpc-core bounds the streams held at once (``grpc.max_concurrent_streams`` with
overload protection: service/grpc_api/http2_limits.py) but has no budget of resets after which
it closes the connection (nghttp2, Envoy and Node.js have one), so each reset still costs this
process a call: a short Python task. A unary client sends its message with its headers and has no
reason to cancel before the server has read it but its deadline passing (a busy server reads
late: those are not counted, instrumented.py); past ``limit`` other such cancels from one address
within ``window`` seconds, the connection is shut down and the address boxed
(service/grpc_api/penalty_box.py): its new connections are dropped for a growing cool-down, and
each of its open connections is shut down at its next call.

grpcio has no call to close one connection, so the socket is found among this process's own
descriptors by its two addresses (service/grpc_api/own_sockets.py) and shut down: grpc-core sees
the connection end and drops every stream on it; the client sees UNAVAILABLE. No GOAWAY is sent
(grpc-core offers no way to send one for a single connection); the Envoy sidecar overlay sends
one where that matters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import unquote

from service.grpc_api import own_sockets
from service.grpc_api.penalty_box import PenaltyBox
from service.metrics import Metrics


def parse_peer(peer: str) -> tuple[str, int] | None:
    """grpc's peer string (``ipv4:127.0.0.1:5555``, ``ipv6:%5B::1%5D:5555``: grpc-core writes an
    IPv6 host percent-encoded in brackets) → (host, port)."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isascii() or not port.isdigit():
        return None
    return own_sockets.plain((unquote(host).strip("[]"), int(port)))


class ResetBudget:
    """Counts calls cancelled before their message arrived, per client address, in fixed windows;
    past ``limit`` in a window the address is boxed. A connection from a boxed address is shut
    down at its next call (or early reset), each once."""

    def __init__(
        self, limit: int, window: float = 10.0, penalty_seconds: float = 10.0, metrics: Metrics | None = None
    ) -> None:
        self.limit = limit
        self.window = window
        self.box = PenaltyBox(penalty_seconds, metrics)
        self.counts: dict[str, int] = {}
        self.window_started = time.monotonic()
        self.shut: set[str] = set()  # connections (peer strings) shut down in this window

    @property
    def local_port(self) -> int:
        return self.box.local_port

    @local_port.setter
    def local_port(self, port: int) -> None:
        self.box.local_port = port

    def note(self, peer: str) -> None:
        """A call from ``peer`` was cancelled before its message arrived."""
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
        if count > self.limit:
            self.box.box(
                address[0], f"more than {self.limit} calls cancelled before their message within {self.window:g} s"
            )
            self._shut(peer, address)  # boxed, or never boxed (loopback): its connection all the same
        elif self.box.holds(address[0]):
            self._shut(peer, address)

    def refuses(self, peer: Callable[[], str]) -> bool:
        """Whether a new call from ``peer()`` comes from a boxed address (its connection then shut
        down). ``peer`` is only called while some address is boxed: the common case costs a test."""
        if not self.box.until:
            return False
        name = peer()
        address = parse_peer(name)
        if address is None or not self.box.holds(address[0]):
            return False
        self._shut(name, address)
        return True

    def _shut(self, peer: str, address: tuple[str, int]) -> None:
        if peer in self.shut or not self.local_port:
            return
        self.shut.add(peer)
        own_sockets.shutdown_connection(self.local_port, address)
