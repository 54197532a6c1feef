"""Client addresses kept off the gRPC port for a cool-down, after they spent their budget of
early resets (HTTP/2 rapid reset: service/grpc_api/reset_budget.py).

Closing an attacker's connection is not enough when it reconnects at once: each new connection
brings another batch of streams that grpc-core reads and hands to Python before the budget can
close it again (measured: 3 reconnecting attackers moved a legitimate Classify's p99 from 12 ms to
0.9 s). So an address past its budget is boxed: a classic BPF socket filter on the gRPC port's
listening socket drops its packets, so its new connections are never established (its SYNs are
dropped; the client's connect times out) and cost this process nothing, and its connections
already open are shut down at their next call. The cool-down doubles each time the same address is
boxed again (``base_seconds``, --grpc-penalty-seconds, up to 30 times it) and is forgotten after
``FORGET_SECONDS`` without one. Each boxing is logged once and counted (cnnserve_grpc_penalties_total).

Every client behind one address (a NAT, a proxy in front of the port) is boxed together: where
that matters, a proxy with per-stream reset accounting belongs in front (the Envoy sidecar).
The host's own loopback address is never boxed (``NEVER_BOXED``): the Envoy sidecar and /readyz's
gRPC self-check come from it, and boxing it would take the whole pod off; its connections are
still shut down past the budget.
A filter is only attached while an address is boxed; without one (not Linux, or the listener
cannot be found) boxed addresses are still refused at each call, the connection shut down.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import logging
import socket
import struct
import time

from service.grpc_api import own_sockets
from service.metrics import Metrics

log = logging.getLogger("cnnserve.grpc")

LONGEST = 30  # the longest cool-down, in first cool-downs
FORGET_SECONDS = 600.0
NEVER_BOXED = frozenset({"127.0.0.1", "::1"})
#: Addresses in the filter at most (each IPv4 address is 2 instructions, IPv6 9; the kernel takes
#: 4096): the most recently boxed ones. Those past it are still refused at each call.
MAX_FILTERED = 256

# Classic BPF (linux/filter.h): instruction = (code, jump if true, jump if false, k).
_LD_H_ABS, _LD_W_ABS, _JEQ_K, _JA, _RET_K = 0x28, 0x20, 0x15, 0x05, 0x06
_SKF_AD_PROTOCOL = -0x1000  # the packet's ethertype (host order)
_SKF_NET_OFF = -0x100000  # offsets from the network (IP) header
_ETH_P_IP = 0x0800
_DROP, _ACCEPT = 0, 0xFFFFFFFF
SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


def drop_filter(addresses: list[str]) -> list[bytes]:
    """A socket filter that drops packets from ``addresses`` (IPv4 or IPv6) and accepts the rest.
    IPv4 clients of a dual-stack listener arrive as IPv4 packets."""
    v4 = [int(ipaddress.IPv4Address(a)) for a in addresses if ":" not in a]
    v6 = [ipaddress.IPv6Address(a).packed for a in addresses if ":" in a]
    v4_block = [_insn(_LD_W_ABS, 0, 0, _SKF_NET_OFF + 12)]  # IPv4 source address
    for a in v4:
        v4_block += [_insn(_JEQ_K, 0, 1, a), _insn(_RET_K, 0, 0, _DROP)]
    v4_block.append(_insn(_RET_K, 0, 0, _ACCEPT))
    v6_block = []
    for packed in v6:  # the 4 words of the source address (offset 8), each compared in turn
        for i in range(4):
            word = int.from_bytes(packed[4 * i : 4 * i + 4], "big")
            v6_block += [_insn(_LD_W_ABS, 0, 0, _SKF_NET_OFF + 8 + 4 * i), _insn(_JEQ_K, 0, 7 - 2 * i, word)]
        v6_block.append(_insn(_RET_K, 0, 0, _DROP))
    v6_block.append(_insn(_RET_K, 0, 0, _ACCEPT))
    head = [
        _insn(_LD_H_ABS, 0, 0, _SKF_AD_PROTOCOL),
        _insn(_JEQ_K, 1, 0, _ETH_P_IP),  # IPv4: skip the jump to the IPv6 block
        _insn(_JA, 0, 0, len(v4_block)),
    ]
    return head + v4_block + v6_block


def attach_filter(sock: socket.socket, program: list[bytes]) -> None:
    code = ctypes.create_string_buffer(b"".join(program))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: the kernel copies it.
    fprog = struct.pack("HxxxxxxQ" if struct.calcsize("P") == 8 else "HxxI", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def detach_filter(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass  # none attached


class PenaltyBox:
    def __init__(self, base_seconds: float = 10.0, metrics: Metrics | None = None) -> None:
        self.base_seconds = base_seconds
        self.metrics = metrics
        self.local_port = 0  # set once the server has bound its port
        self.until: dict[str, float] = {}  # boxed address -> end of its cool-down (monotonic)
        self.offences: dict[str, tuple[int, float]] = {}  # address -> (times boxed, when last)
        self.filtered = False  # a filter is attached to the listener

    def holds(self, address: str) -> bool:
        return address in self.until

    def box(self, address: str, reason: str) -> None:
        """Keep ``address`` off the port for its next cool-down (once; no-op while boxed)."""
        if address in self.until or address in NEVER_BOXED:
            return
        now = time.monotonic()
        times, last = self.offences.get(address, (0, now))
        times = 1 if now - last > FORGET_SECONDS else times + 1
        self.offences[address] = (times, now)
        seconds = self.base_seconds * min(LONGEST, 2 ** (times - 1))
        self.until[address] = now + seconds
        asyncio.get_running_loop().call_later(seconds, self._release, address)
        self._refilter()
        if self.metrics is not None:
            self.metrics.grpc_penalties.inc()
        log.warning(
            "gRPC client %s in the penalty box for %g s (time %d): %s; its new connections are %s, "
            "its open ones shut down at their next call",
            address,
            seconds,
            times,
            reason,
            "dropped by a socket filter" if self.filtered else "shut down at their first call",
        )

    def _release(self, address: str) -> None:
        if self.until.pop(address, None) is not None:
            self._refilter()
        # Forget old offenders for good, so the dict does not grow with every address ever boxed.
        now = time.monotonic()
        for a, (_, last) in list(self.offences.items()):
            if now - last > FORGET_SECONDS and a not in self.until:
                del self.offences[a]

    def _refilter(self) -> None:
        if not self.local_port:
            return
        boxed = sorted(self.until, key=self.until.__getitem__)[-MAX_FILTERED:]
        if boxed:
            program = drop_filter(boxed)
            self.filtered = own_sockets.on_listeners(self.local_port, lambda s: attach_filter(s, program)) > 0
        elif self.filtered:
            own_sockets.on_listeners(self.local_port, detach_filter)
            self.filtered = False
