"""One synchronous request before the run: is the target there, and does it answer right?"""

from __future__ import annotations

import json
from dataclasses import dataclass

from loadtest.config import LoadConfig, LoadTestError
from loadtest.payloads import CLASSIFY_METHOD, MODEL_INFER_METHOD, Payload


@dataclass(frozen=True)
class Probe:
    """What answered the probe: the model and version the server says it ran, and a one-line summary."""

    model: str
    version: str
    summary: str


def check_target(cfg: LoadConfig, payload: Payload) -> Probe:
    """Send one request with a plain blocking client and check the answer's shape.
    Returns what answered; raises LoadTestError with the reason otherwise."""
    import urllib.error
    import urllib.request

    address, k, target = cfg.resolved_address(), cfg.images_per_request, cfg.target
    try:
        security = cfg.security()
    except OSError as e:
        raise LoadTestError(f"cannot read --access-key-file: {e}") from None
    if target.startswith("grpc"):
        import grpc

        method = CLASSIFY_METHOD if target == "grpc" else MODEL_INFER_METHOD
        with security.grpc_channel(
            address, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        ) as channel:
            try:
                raw = channel.unary_unary(method)(
                    payload.body, timeout=max(cfg.timeout, 10.0), metadata=security.grpc_metadata()
                )
            except grpc.RpcError as e:
                hint = (
                    " (does this server have the Open Inference Protocol service?)"
                    if target == "grpc-v2" and e.code() == grpc.StatusCode.UNIMPLEMENTED
                    else ""
                )
                raise LoadTestError(f"{target} {address}: {e.code().name}: {e.details()}{hint}") from None
        if target == "grpc":
            from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb

            resp = pb.ClassifyResponse.FromString(raw)
            if len(resp.results) != k:
                raise LoadTestError(f"{target}: {len(resp.results)} results for {k} images")
            top1 = resp.results[0].predictions[0].label
            return Probe(resp.model, resp.model_version, f"model {resp.model}/{resp.model_version}, top-1 {top1!r}")
        from tritonclient.grpc import service_pb2 as tpb

        resp = tpb.ModelInferResponse.FromString(raw)
        shapes = {o.name: list(o.shape) for o in resp.outputs}
        if not shapes or any(s[:1] != [k] for s in shapes.values()):
            raise LoadTestError(f"{target}: unexpected outputs {shapes} for {k} images")
        summary = f"model {resp.model_name}/{resp.model_version}, outputs {shapes}"
        return Probe(resp.model_name, resp.model_version, summary)
    url = f"{security.scheme}://{address}{payload.path}"
    headers = {**payload.extra_headers, **security.headers()}
    if payload.content_type:
        headers["Content-Type"] = payload.content_type
    req = urllib.request.Request(url, data=payload.body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=max(cfg.timeout, 10.0), context=security.ssl_context()) as r:
            body, header_len = r.read(), r.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode(errors="replace")
        hint = (
            " (does this server have the Open Inference Protocol endpoints?)"
            if target == "http-v2" and e.code in (404, 405)
            else ""
        )
        raise LoadTestError(f"{target} {url}: HTTP {e.code}: {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LoadTestError(f"{target} {url}: {getattr(e, 'reason', e)}") from None
    if target == "http":
        doc = json.loads(body)
        if len(doc.get("results", [])) != k:
            raise LoadTestError(f"{target}: {len(doc.get('results', []))} results for {k} images")
        top1 = doc["results"][0]["predictions"][0]["label"]
        return Probe(doc["model"], doc["model_version"], f"model {doc['model']}/{doc['model_version']}, top-1 {top1!r}")
    doc = json.loads(body[: int(header_len)] if header_len else body)
    shapes = {o["name"]: o["shape"] for o in doc.get("outputs", [])}
    if not shapes or any(s[:1] != [k] for s in shapes.values()):
        raise LoadTestError(f"{target}: unexpected outputs {shapes} for {k} images")
    binary = "binary" if header_len else "JSON (the server ignored binary_data_output)"
    model, version = str(doc.get("model_name", "")), str(doc.get("model_version", ""))
    return Probe(model, version, f"model {model}/{version}, outputs {shapes} {binary}")
