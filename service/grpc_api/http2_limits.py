"""grpc-core's HTTP/2 limits for the gRPC port, as channel arguments of the server (issue 17).

What grpc-core (grpcio 1.81) offers and what is set here, each against one attack class:

- ``grpc.max_concurrent_streams``: advertised in SETTINGS (none by default, so a client could
  open thousands of streams per connection). With ``grpc.http.overload_protection`` (on by
  default, set explicitly) a stream keeps counting against it until the server has freed it, so
  a client that opens and resets streams (HTTP/2 rapid reset, CVE-2023-44487) cannot have more
  than this many in the server at once; streams past it are refused with RST_STREAM
  (REFUSED_STREAM), after a delay ("tarpit", 100 ms-1 s by default) that slows the attacker.
  A stream that finished normally counts the same way until the server's Python has freed it,
  and a busy front end frees them late: with 100, a client keeping 100 calls in flight on one
  connection (below what it was told) had 38 % of them refused, and 64 callers some. Hence a
  default of 2048, above the call slots (``max_connections``, 1024): a client that overloads the
  server is answered RESOURCE_EXHAUSTED by them and the queue, not by refused streams. The
  rapid-reset bound that matters is ``grpc_max_early_resets`` (reset_budget.py), which shuts the
  connection long before.
  grpc-core has no budget of resets after which it sends GOAWAY (nghttp2, Envoy and Node.js
  have one): the Envoy sidecar overlay (deploy/overlays/envoy-sidecar) adds it where wanted.
- ``grpc.http2.max_requests_per_read``: new streams accepted per read of the socket (32, the
  default, set explicitly): a batch of resets in one packet cannot create thousands of calls.
- ``grpc.per_message_decompression`` off: grpc-core would inflate a ``grpc-encoding: gzip``
  message whole before comparing it with ``grpc.max_receive_message_length`` (1 MB on the wire
  inflating to 1 GiB took seconds and GBs). Compressed calls are refused with UNIMPLEMENTED before
  their message is read (service/grpc_api/instrumented.py); the clients we serve (our own,
  tritonclient, perf_analyzer, grpcurl) compress only when asked to.
- ``grpc.server_handshake_timeout_ms``: a connection that has not finished the HTTP/2 preface
  and SETTINGS exchange is closed after ``header_timeout_seconds`` (grpc-core: 120 s).
- ``grpc.http2.min_ping_interval_without_data_ms`` and ``grpc.keepalive_permit_without_calls``:
  a client's keepalive PINGs are accepted every ``grpc_min_ping_interval_seconds`` (10 s, the
  floor gRPC sets for client keepalive), with or without calls. grpc-core's own policy (5 min,
  never without calls) answers a client keeping an idle channel alive every 10-30 s (the usual
  setting behind cloud load balancers) with GOAWAY ENHANCE_YOUR_CALM "too_many_pings" after two
  strikes; a PING flood still gets that GOAWAY (``grpc.http2.max_ping_strikes``, 2).

Not available in grpc-core, handled elsewhere: a stream that never sends its message is ended
by the handler after ``body_timeout_seconds`` (instrumented.py); a length prefix far above
``max_receive_message_length`` is not refused before the data arrives (grpc-core raises the
stream's flow-control window to the declared length and buffers the message whole; checked
here with raw h2 frames): only the message timeout bounds it, and the Envoy sidecar caps the
bytes of a request body. README "Limits and timeouts" lists what a client gets past each.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

from service.settings import Settings

MAX_REQUESTS_PER_READ = 32


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.http.overload_protection", 1),
        ("grpc.http2.max_requests_per_read", MAX_REQUESTS_PER_READ),
        ("grpc.per_message_decompression", 0),
        ("grpc.server_handshake_timeout_ms", max(1, round(settings.header_timeout_seconds * 1000))),
        # Client keepalive: accepted down to the interval, idle or not; faster is a ping flood.
        # At least 1 ms: grpc-core reads 0 as "no limit", which would drop the ping-flood bound.
        ("grpc.http2.min_ping_interval_without_data_ms", max(1, round(settings.grpc_min_ping_interval_seconds * 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


_libc: ctypes.CDLL | None = None
_trim_pending = False


def trim_heap_soon(delay: float = 1.0) -> None:
    """Return freed heap to the OS ``delay`` seconds from now (glibc's ``malloc_trim``), at most
    once per ``delay``. Called when a call that may have buffered a large message is ended by the
    message timeout: grpc-core frees the message's slices as the call is destroyed, but glibc
    keeps those pages (measured: 600 MiB buffered, +130 MB resident 25 s later without a trim)."""
    global _trim_pending
    if _trim_pending:
        return
    _trim_pending = True
    asyncio.get_running_loop().call_later(delay, _trim)


def _trim() -> None:
    global _libc, _trim_pending
    _trim_pending = False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        pass
