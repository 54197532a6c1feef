"""What is checked before a server binds anything, and binding its ports: shared by one
process's server (``service.server``) and the supervisor of a multi-process one
(``service.workers.supervisor``), which reserves the ports for its front ends."""

from __future__ import annotations

import errno
import socket

from service.inference import repository
from service.settings import Settings


class StartupError(Exception):
    """Something the user must fix before the server can start; its message is the one line shown."""


def port_in_use(protocol: str, host: str, port: int) -> StartupError:
    flag = f"--{protocol.lower()}-port"
    return StartupError(
        f"{protocol} port {port} is already in use on {host}: stop the other server or pick another "
        f"port with {flag} (CNNSERVE_{protocol.upper()}_PORT)"
    )


def bind_listener(host: str, port: int, protocol: str, reuse_port: bool = False) -> socket.socket:
    """A bound TCP socket for ``protocol`` (not listening yet); a taken port is a StartupError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise port_in_use(protocol, host, port) from None
        raise StartupError(f"cannot listen on {host}:{port} for {protocol}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def check_repository(settings: Settings) -> list[repository.ModelSpec]:
    """The model repository's versions, or a StartupError naming its absolute path."""
    try:
        specs = repository.scan(settings.model_repository)
    except FileNotFoundError as e:
        hint = "give the folder of models with --model-repository or CNNSERVE_MODEL_REPOSITORY"
        raise StartupError(f"{e}; {hint}") from None
    try:
        repository.check_files(specs)  # here, once: not once per worker process
    except ValueError as e:
        raise StartupError(str(e)) from None
    return specs
