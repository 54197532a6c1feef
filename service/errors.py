"""Domain errors, and their two maps: to HTTP status codes and to gRPC status codes.

Transports raise nothing else on purpose; they translate these once, here, so the HTTP and gRPC
adapters never decide a status code on their own.
"""
from __future__ import annotations

import grpc


class ServiceError(Exception):
    """Base of every error a client can cause or observe. ``reason`` labels the
    ``cnnserve_rejected_total`` counter."""

    reason = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request body or an image in it is malformed (bad base64, not an image, wrong shape)."""
    reason = "invalid"


class InvalidParameter(ServiceError):
    """A parameter is well-formed but out of range (top_k=0)."""
    reason = "invalid"


class ModelNotFound(ServiceError):
    reason = "not_found"


class PayloadTooLarge(ServiceError):
    reason = "too_large"


class UnsupportedMediaType(ServiceError):
    reason = "unsupported_media_type"


class NotReady(ServiceError):
    """Models still loading, or the server is draining."""
    reason = "not_ready"


class Overloaded(ServiceError):
    """The model's queue is full; retry after ``retry_after_s``."""
    reason = "queue_full"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServiceError):
    reason = "deadline"


class Cancelled(ServiceError):
    """The client went away before its request was computed."""
    reason = "cancelled"


class InferenceFailed(ServiceError):
    """The runtime failed on a batch; every request of that batch gets this error."""
    reason = "inference_error"


HTTP_STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    ModelNotFound: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    Overloaded: 429,
    Cancelled: 499,
    InferenceFailed: 500,
    NotReady: 503,
    DeadlineExceeded: 504,
}

GRPC_STATUS: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidParameter: grpc.StatusCode.INVALID_ARGUMENT,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Cancelled: grpc.StatusCode.CANCELLED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def http_status(error: ServiceError) -> int:
    return HTTP_STATUS.get(type(error), 500)


def grpc_status(error: ServiceError) -> grpc.StatusCode:
    return GRPC_STATUS.get(type(error), grpc.StatusCode.INTERNAL)
