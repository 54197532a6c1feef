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
from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType, shown
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


#: Most gzip members in one body: tritonclient sends one, ``cat a.gz b.gz`` a few; a body of
#: thousands of empty members (20 bytes each) is an attack on the inflater's per-member cost.
MAX_GZIP_MEMBERS = 1024
_FIRST_FEED = 256  # bytes first given to a member's inflater, doubled while the member goes on


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), refusing
    bodies that inflate past ``limit`` bytes. A gzip body of several members (RFC 1952 allows it,
    ``cat a.gz b.gz``) is inflated whole, as ``gzip -d`` does, up to MAX_GZIP_MEMBERS members;
    bytes after a deflate stream are refused. Linear in the body's size: each member's inflater
    is fed pieces of the body that double in size, so the bytes left over after a member ends
    (zlib copies them into ``unused_data``) are at most its own size, never the rest of the body
    (which made a body of many empty members cost the square of its size)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding[:40]!r} (use gzip, deflate or none)")
    wbits = 31 if encoding == "gzip" else 15
    view = memoryview(body)
    parts: list[bytes] = []
    size = pos = members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise InvalidInput(f"body has more than {MAX_GZIP_MEMBERS} {encoding} members")
        inflater = zlib.decompressobj(wbits=wbits)
        feed = _FIRST_FEED
        while not inflater.eof:
            if pos >= len(body):
                raise InvalidInput(f"body is not valid {encoding} data: truncated stream")
            piece = view[pos : pos + feed]
            pos += len(piece)
            feed *= 2
            try:
                out = inflater.decompress(piece, limit + 1 - size)
            except zlib.error as e:
                raise InvalidInput(f"body is not valid {encoding} data: {e}") from None
            size += len(out)
            if size > limit or inflater.unconsumed_tail:
                raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
            if out:
                parts.append(out)
        pos -= len(inflater.unused_data)  # the next member's first bytes
        if pos >= len(body):
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if encoding != "gzip":
            raise InvalidInput(f"body has {len(body) - pos} bytes after the end of its {encoding} stream")


def _json_dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    return value


MAX_NAME = 256  # characters of a tensor name or datatype

#: Commas a v2 JSON body may hold beyond one per number: names, shapes, parameters, outputs.
JSON_FIELD_COMMAS = 4096


def parse_rest_request(
    model: str, version: str, body: bytes, header_length: str | None, max_numbers: int | None = None
) -> InferRequest:
    """An inference request from a REST body: a JSON object, optionally followed by the binary
    data of the inputs that carry ``parameters.binary_data_size`` (in input order) when the
    ``Inference-Header-Content-Length`` header gives the JSON part's size. ``max_numbers``: the
    most tensor elements a request to this model can hold; a JSON part with more commas than that
    (plus a few fields) is refused before it is parsed (413): parsing and converting millions of
    numbers costs seconds before the shape check could refuse them."""
    view = memoryview(body)
    split = len(body)
    if header_length is not None:
        split = parse_uint(header_length, "Inference-Header-Content-Length")
        if split > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length!r} is not a size within the {len(body)}-byte body"
            )
    if max_numbers is not None and body.count(b",", 0, split) > max_numbers + JSON_FIELD_COMMAS:
        raise PayloadTooLarge(f"the JSON body holds more numbers than a request to this model can ({max_numbers})")
    head, binary = view[:split], view[split:]
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
        if len(name) > MAX_NAME or len(datatype) > MAX_NAME:
            # Names are echoed in errors further on: a megabyte-long one is refused here, cut short.
            raise InvalidInput(f"inputs[{i}]: name or datatype longer than {MAX_NAME} characters: {shown(name)}")
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
        if len(item["name"]) > MAX_NAME:
            raise InvalidInput(f"outputs[{i}]: name longer than {MAX_NAME} characters: {shown(item['name'])}")
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
    max_numbers: int | None = None,
) -> InferRequest:
    """``decompress`` + ``parse_rest_request``; through ``offload`` (a worker thread: the server
    passes its decode pool) when there is much to inflate or a large JSON part to parse, so that one
    big JSON tensor does not stall every other request."""
    json_part = parse_uint(header_length, "Inference-Header-Content-Length") if header_length else len(body)

    def work() -> InferRequest:
        return parse_rest_request(model, version, decompress(body, content_encoding, limit), header_length, max_numbers)

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
