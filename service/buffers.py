"""The request bytes held in memory by requests in progress (HTTP bodies and gRPC messages),
bounded by ``max_buffered_bytes`` across every connection of the process."""

from __future__ import annotations

from service.errors import BufferFull


class BufferedBytes:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def hold(self, n: int) -> None:
        """Count ``n`` more bytes; BufferFull (503 / UNAVAILABLE) if they do not fit. Give them back
        with ``release`` when the request ends."""
        if self.held + n > self.limit:
            raise BufferFull(
                f"server busy: {self.held} request bytes already buffered (limit {self.limit}); retry shortly"
            )
        self.held += n

    def release(self, n: int) -> None:
        self.held -= n
