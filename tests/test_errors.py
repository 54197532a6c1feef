"""Every domain error maps to a deliberate HTTP status and gRPC code, subclasses included (no server)."""

from __future__ import annotations

import grpc
import orjson

from service import errors
from service.errors import InferenceFailed, InvalidInput, ServiceError, grpc_status, http_status
from service.http_api.context import error_response


def all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *all_subclasses(sub)]
    return found


def make(cls: type[ServiceError]) -> ServiceError:
    return cls("something went wrong")


def test_every_service_error_maps_to_a_client_status_except_inference_failures():
    classes = all_subclasses(ServiceError)
    module_classes = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, ServiceError)}
    assert module_classes - {ServiceError} <= set(classes)
    assert len(classes) >= 10
    for cls in classes:
        error = make(cls)
        if issubclass(cls, InferenceFailed):
            assert (http_status(error), grpc_status(error)) == (500, grpc.StatusCode.INTERNAL)
            continue
        assert 400 <= http_status(error) < 600 and http_status(error) != 500, cls
        assert grpc_status(error) not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK), cls
        assert error.reason != "error", f"{cls.__name__} needs its own rejected-metric reason"


def test_a_new_subclass_inherits_its_parents_statuses_on_both_transports():
    class BadColourSpace(InvalidInput):
        """Defined here, after the transports were imported: nothing registers it."""

    error = BadColourSpace("CMYK is not supported")
    assert http_status(error) == 400 and grpc_status(error) == grpc.StatusCode.INVALID_ARGUMENT
    response = error_response(error)
    assert response.status_code == 400
    assert orjson.loads(response.body) == {"error": "CMYK is not supported"}
    assert error.reason == "invalid"


def test_overloaded_answers_carry_retry_after():
    response = error_response(errors.Overloaded("queue full", retry_after_s=2.2))
    assert response.status_code == 429 and response.headers["Retry-After"] == "3"
