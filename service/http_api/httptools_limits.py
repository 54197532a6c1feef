"""uvicorn's httptools protocol with the limits it lacks, enforced as the bytes arrive.

httptools has no limit on the request line and headers and grows a header value by repeated
concatenation (quadratic: a 64 MiB header took 6 s of event-loop time), and uvicorn has no header
or body read timeout. This subclass adds, per connection and at the cost of a counter and two
timers per request:

- ``max_header_bytes``: bytes of request line + headers, counted twice: the bytes of each socket
  read while the headers are incomplete, before the parser is fed again (a header sent slowly
  never grows past one read beyond the limit), and the URL and each header as the parser hands
  them over (so headers that arrive in one read with their end are counted too: a 100 KiB
  header in one write was accepted when only reads were counted); and ``max_headers``: 431 and
  the connection closed past either;
- ``header_timeout``: from a new connection, or a request's first byte, to the end of its headers;
- ``body_timeout``: from the end of a request's headers to the end of its body.
  Past either: 408 and the connection closed (a request being answered is only closed);
- ``max_connections_per_client``: connections open at once from one client address (0: no cap),
  so that one client cannot take every slot of ``max_connections`` (1,100 half-sent headers from
  one address held every slot until the header timeout): a connection past it is answered 503 and
  closed as it opens.

h11 enforces a header size limit too, but parses several times slower than httptools; keeping
httptools and counting here costs nothing measurable (bench/compare_revisions.py).
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections_per_client: int = 0


class _Refusal(Exception):
    """Raised in a parser callback to stop parsing and answer ``status`` (then close)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with header size/count limits and header/body read timeouts."""

    limits = HttpLimits()
    #: Connections open per client address, for max_connections_per_client (one per server).
    open_per_client: ClassVar[collections.Counter[str]] = collections.Counter()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._parsed_bytes = 0
        self._timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.limits.header_timeout, self._timed_out, "headers"
        )
        cap = self.limits.max_connections_per_client
        self._client_address = self.client[0] if cap and self.client else None  # None: not counted
        if self._client_address is not None:
            self.open_per_client[self._client_address] += 1
            if self.open_per_client[self._client_address] > cap:
                self._refuse(503, f"server busy: {cap} connections open from your address (max_connections_per_client)")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        address = self._client_address
        if address is not None:
            self._client_address = None
            self.open_per_client[address] -= 1
            if self.open_per_client[address] <= 0:
                del self.open_per_client[address]
        super().connection_lost(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._in_headers:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            refusal = e.__context__
            if isinstance(refusal, _Refusal):
                self._refuse(refusal.status, refusal.message)
            else:
                self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserError:
            self._refuse(400, "Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._in_headers and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")

    # ---- parser callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_count = 0
        self._parsed_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._count_parsed(len(url) + 16)  # + method, version, separators
        super().on_url(url)
        if self._timer is None:
            self._timer = self.loop.call_later(self.limits.header_timeout, self._timed_out, "headers")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _Refusal(431, f"more than {self.limits.max_headers} request headers")
        self._count_parsed(len(name) + len(value) + 4)  # + ": " and CRLF
        super().on_header(name, value)

    def _count_parsed(self, n: int) -> None:
        self._parsed_bytes += n
        if self._parsed_bytes > self.limits.max_header_bytes:
            raise _Refusal(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._cancel_timer()
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn's own check would answer text/plain; every error of ours is JSON.
            raise _Refusal(503, f"server busy: {limit} connections or requests in progress (max_connections)")
        self._timer = self.loop.call_later(self.limits.body_timeout, self._timed_out, "body")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_timer()
        self._in_headers = True  # the next bytes on this connection start the next request
        self._header_bytes = 0
        super().on_message_complete()

    # ---- refusals -----------------------------------------------------------------------------
    def _timed_out(self, what: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if what == "body" and cycle is not None and cycle.response_started:
            self.transport.close()  # being answered already: nothing else can be said
            return
        limit = self.limits.header_timeout if what == "headers" else self.limits.body_timeout
        self._refuse(408, f"request {what} not received within {limit:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with a JSON error and close; the request (if any) sees a disconnect."""
        body = b'{"error":"' + message.replace('"', "'").encode("ascii", "replace") + b'"}'
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        if status == 503:
            content.append(b"retry-after: 1\r\n")
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                content = []  # a response is under way: only close
            cycle.disconnected = True
            cycle.message_event.set()
        if content:
            self.transport.write(b"".join(content))
        self._cancel_timer()
        self.transport.close()


def protocol_class(limits: HttpLimits) -> type[LimitedHttpToolsProtocol]:
    """A LimitedHttpToolsProtocol subclass bound to ``limits`` (uvicorn instantiates the class),
    with its own count of connections per client address."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {"limits": limits, "open_per_client": collections.Counter()},
    )
