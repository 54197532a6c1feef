"""The Open Inference Protocol's REST body format: JSON, plus Triton's binary tensor extension
(``Inference-Header-Content-Length``) and request compression. Turns bodies into
:class:`service.protocol.open_inference.InferRequest` and :class:`~service.protocol.open_inference.InferResponse`
into bodies; everything else about the protocol is in ``service.protocol.open_inference``."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import orjson

from service.ascii_numbers import parse_uint
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.protocol.open_inference import (
    INLINE_PARSE_BYTES,
    InferRequest,
    InferResponse,
    InputTensor,
    tensor_numbers,
    typed_parameter,
)

HEADER_LENGTH = "inference-header-content-length"
T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn(*args)`` off the event loop (``asyncio.to_thread``, or the server's decode pool)."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


# Triton's binary tensor extension (HTTP)


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), refusing
    bodies that inflate past ``limit`` bytes. A gzip body of several members (RFC 1952 allows it,
    ``cat a.gz b.gz``) is inflated whole, as ``gzip -d`` does; bytes after a deflate stream are refused."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r} (use gzip, deflate or none)")
    wbits = 31 if encoding == "gzip" else 15
    parts: list[bytes] = []
    size, rest = 0, body
    while True:
        inflater = zlib.decompressobj(wbits=wbits)
        try:
            out = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as e:
            raise InvalidInput(f"body is not valid {encoding} data: {e}") from None
        size += len(out)
        if size > limit or inflater.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise InvalidInput(f"body is not valid {encoding} data: truncated stream")
        parts.append(out)
        rest = inflater.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if encoding != "gzip":
            raise InvalidInput(f"body has {len(rest)} bytes after the end of its {encoding} stream")


def _json_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


def parse_rest_request(model: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    """An inference request from a REST body: a JSON object, optionally followed by the binary
    data of the inputs that carry ``parameters.binary_data_size`` (in input order) when the
    ``Inference-Header-Content-Length`` header gives the JSON part's size."""
    view = memoryview(body)
    if header_length is not None:
        split = parse_uint(header_length, "Inference-Header-Content-Length")
        if split > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length!r} is not a size within the {len(body)}-byte body"
            )
        head, binary = view[:split], view[split:]
    else:
        head, binary = view, view[len(body) :]
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"inference request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("inference request must be a JSON object")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise InvalidInput('inference request needs "inputs": a non-empty list')
    offset = 0
    inputs = []
    for i, item in enumerate(inputs_doc):
        if not isinstance(item, dict):
            raise InvalidInput(f"inputs[{i}] must be a JSON object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise InvalidInput(f'inputs[{i}] needs "name" and "datatype" strings and a "shape" list')
        params = _json_dict(item.get("parameters"), f"inputs[{i}].parameters")
        size = typed_parameter(params, "binary_data_size", int, None, f"input {name!r}")
        raw = None
        if size is not None:
            if size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} exceeds the {len(binary) - offset} "
                    "bytes of binary data left in the body"
                )
            raw = binary[offset : offset + size]
            offset += size
            if "data" in item:
                raise InvalidInput(f"input {name!r} has both data and binary_data_size")
        data = tensor_numbers(name, item["data"]) if item.get("data") is not None else None
        inputs.append(InputTensor(name, datatype, shape, data=data, raw=raw))
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary)} bytes of binary data but the inputs' binary_data_size add up to {offset}"
        )
    outputs = []
    outputs_doc = doc.get("outputs") or []
    if not isinstance(outputs_doc, list):
        raise InvalidInput('"outputs" must be a list')
    for i, item in enumerate(outputs_doc):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f'outputs[{i}] must be an object with a "name" string')
        outputs.append((item["name"], _json_dict(item.get("parameters"), f"outputs[{i}].parameters")))
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput('"id" must be a string')
    return InferRequest(model, version, request_id, _json_dict(doc.get("parameters"), "parameters"), inputs, outputs)


async def read_rest_request(
    model: str,
    version: str,
    body: bytes,
    header_length: str | None,
    content_encoding: str | None,
    limit: int,
    offload: Offload = asyncio.to_thread,
) -> InferRequest:
    """``decompress`` + ``parse_rest_request``; through ``offload`` (a worker thread: the server
    passes its decode pool) when there is much to inflate or a large JSON part to parse, so that one
    big JSON tensor does not stall every other request."""
    json_part = parse_uint(header_length, "Inference-Header-Content-Length") if header_length else len(body)

    def work() -> InferRequest:
        return parse_rest_request(model, version, decompress(body, content_encoding, limit), header_length)

    if content_encoding is None and json_part <= INLINE_PARSE_BYTES:
        return work()
    return await offload(work)


def encode_rest_response(response: InferResponse) -> tuple[bytes, int | None]:
    """The REST response body and, when some output went to the binary section, the JSON part's
    length for the ``Inference-Header-Content-Length`` header (else None: the body is JSON)."""
    outputs, binaries = [], []
    for out in response.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.binary:
            raw = out.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binaries.append(raw)
        else:
            entry["data"] = out.json_data()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["outputs"] = outputs
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not binaries:
        return head, None
    return b"".join([head, *binaries]), len(head)
