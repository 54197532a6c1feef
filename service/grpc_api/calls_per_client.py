"""Calls in progress per client address on the gRPC port, capped (``--grpc-max-calls-per-client``).

``--max-connections`` bounds the calls one front end runs at once (grpc-core's
``maximum_concurrent_rpcs``), and ``--grpc-max-concurrent-streams`` the calls on one connection,
but nothing in grpc-core bounds one client's calls over many connections: a client opening a few
connections of headers-only streams held every call slot until the message timeout, and every
other caller got RESOURCE_EXHAUSTED meanwhile (issue 17). Past the cap a call from that address is
refused at once (RESOURCE_EXHAUSTED), so one address holds at most the cap, and the other slots
stay for everyone else. Not shared out among front ends: a connection, with all its calls, lands
on one front end. The host's own loopback addresses are not counted: the Envoy sidecar sends every
client from there, and /readyz's gRPC self-check comes from there (as ``penalty_box.NEVER_BOXED``).
"""

from __future__ import annotations

from collections.abc import Callable

from service.grpc_api.penalty_box import NEVER_BOXED
from service.grpc_api.reset_budget import parse_peer


class CallsPerClient:
    """One front end's count of calls in progress per client address (``cap`` 0: none counted)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open: dict[str, int] = {}

    def admit(self, peer: Callable[[], str]) -> str | None:
        """Count a call from ``peer()`` (grpc's peer string, asked only when there is a cap); the
        address to :meth:`release` when it ends, "" when not counted, or None when that address
        is at its cap (refuse the call)."""
        if not self.cap:
            return ""
        parsed = parse_peer(peer())
        if parsed is None or parsed[0] in NEVER_BOXED:  # not an IP peer, or this host's loopback
            return ""
        address = parsed[0]
        held = self.open.get(address, 0)
        if held >= self.cap:
            return None
        self.open[address] = held + 1
        return address

    def release(self, address: str) -> None:
        if not address:
            return
        held = self.open[address] - 1
        if held:
            self.open[address] = held
        else:
            del self.open[address]
