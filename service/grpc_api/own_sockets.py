"""This process's own TCP sockets, found by address among its descriptors (a scan of
/proc/self/fd), for what grpcio offers no call for: shutting down one client's connection, and
attaching a socket filter to the listening socket (service/grpc_api/penalty_box.py).

Each socket is reached through a duplicate of grpc-core's descriptor: shutdown(2) and setsockopt
act on the socket itself, closing the duplicate leaves grpc-core's descriptor open. Scans happen
only when a client has spent its budget, never per call.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any


def plain(address: tuple[Any, ...]) -> tuple[str, int]:
    """grpc-core listens on dual-stack IPv6 sockets: an IPv4 peer shows as ``::ffff:a.b.c.d``."""
    host = address[0]
    return (host[7:] if host.startswith("::ffff:") else host), address[1]


def _tcp_sockets() -> Iterator[socket.socket]:
    """A duplicate of each TCP socket this process holds, closed when the caller moves on."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
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
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                yield sock
        finally:
            sock.close()  # closes the duplicate only


def shutdown_connection(local_port: int, peer: tuple[str, int]) -> bool:
    """Shut down this process's TCP socket from ``local_port`` to ``peer``; False if none is found."""
    for sock in _tcp_sockets():
        try:
            if sock.getsockname()[1] == local_port and plain(sock.getpeername()) == peer:
                sock.shutdown(socket.SHUT_RDWR)
                return True
        except OSError:
            pass  # not connected (a listener), or gone meanwhile
    return False


def on_listeners(local_port: int, action: Callable[[socket.socket], None]) -> int:
    """``action`` on each listening socket of ``local_port`` (several with SO_REUSEPORT in one
    process, or IPv4 and IPv6); returns how many there were."""
    done = 0
    for sock in _tcp_sockets():
        try:
            if sock.getsockname()[1] == local_port and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                action(sock)
                done += 1
        except OSError:
            pass
    return done
