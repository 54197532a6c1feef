"""Domain errors, each carrying its HTTP status code and gRPC status code.

Transports raise nothing else on purpose; they translate these once, through ``http_status`` and
``grpc_status``, so the HTTP and gRPC adapters never decide a status code on their own.
"""

from __future__ import annotations

import grpc


def shown(text: object, limit: int = 64) -> str:
    """``repr(text)`` for an error message, cut to about ``limit`` characters: names and numbers a
    client sent are echoed so the error says what was wrong, but a 1 MB model name is not."""
    if isinstance(text, str) and len(text) > limit:
        return f"{text[:limit]!r}… ({len(text)} characters)"
    return repr(text)


class ServiceError(Exception):
    """Base of every error a client can cause or observe. Each class carries its HTTP status and
    gRPC code (MLServer's way), so a subclass inherits its parent's unless it says otherwise.
    ``reason`` labels the ``cnnserve_rejected_total`` counter; ``counted_by_batcher`` is true for
    reasons the batcher itself counts when it refuses or drops a request (the transports must not
    count those again)."""

    reason = "error"
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    counted_by_batcher = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request body or an image in it is malformed (bad base64, not an image, wrong shape)."""

    reason = "invalid"
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidParameter(ServiceError):
    """A parameter is well-formed but out of range (top_k=0)."""

    reason = "invalid"
    http_status = 422
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(ServiceError):
    reason = "not_found"
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND


class PayloadTooLarge(ServiceError):
    reason = "too_large"
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnsupportedMediaType(ServiceError):
    reason = "unsupported_media_type"
    http_status = 415
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class NotReady(ServiceError):
    """Models still loading, or the server is draining."""

    reason = "not_ready"
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE


class BufferFull(NotReady):
    """Too many request bytes are held in memory across all requests (max_buffered_bytes): 503 +
    Retry-After / UNAVAILABLE at once."""

    reason = "buffers_full"


class Overloaded(ServiceError):
    """The model's queue is full; retry after ``retry_after_s``."""

    reason = "queue_full"
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    counted_by_batcher = True

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    reason = "deadline"
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    counted_by_batcher = True


class Cancelled(ServiceError):
    """The client went away before its request was computed."""

    reason = "cancelled"
    http_status = 499
    grpc_code = grpc.StatusCode.CANCELLED
    counted_by_batcher = True


class InferenceFailed(ServiceError):
    """The runtime failed on a batch; every request of that batch gets this error."""

    reason = "inference_error"
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL


def http_status(error: ServiceError) -> int:
    return error.http_status


def grpc_status(error: ServiceError) -> grpc.StatusCode:
    return error.grpc_code
