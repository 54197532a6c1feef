"""Request bodies, built and serialised once before the run: a request then costs one write."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from loadtest.config import DEFAULT_MODEL, LoadConfig

PAYLOAD_BYTES_BUDGET = 256 * 1024 * 1024  # pre-built request bodies per process, at most
MAX_PAYLOADS = 1024
CLASSIFY_METHOD = "/cnnserve.v1.Classifier/Classify"
MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _content_type(image: bytes) -> str:
    return "image/png" if image.startswith(b"\x89PNG") else "image/jpeg"


@dataclass
class Payload:
    """One pre-built request: the body, and (HTTP) the headers that go with it."""

    body: bytes
    content_type: str | None = None
    extra_headers: dict = field(default_factory=dict)
    path: str = "/"


def _groups(n_items: int, k: int, budget_items: int, offset: int) -> list[list[int]]:
    """Index groups of k items (wrapping around), enough to use every item once, bounded."""
    count = max(1, min(MAX_PAYLOADS, -(-n_items // k), max(1, budget_items // k)))
    return [[(offset + g * k + j) % n_items for j in range(k)] for g in range(count)]


def build_payloads(cfg: LoadConfig, images: list[bytes], tensor: np.ndarray | None, offset: int = 0) -> list[Payload]:
    k = cfg.images_per_request
    target = cfg.target
    model = cfg.model or DEFAULT_MODEL
    if target == "grpc":
        from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb

        size = sum(len(im) for im in images) / len(images) * k
        out = []
        for group in _groups(len(images), k, int(PAYLOAD_BYTES_BUDGET / max(1.0, size)) * k, offset):
            req = pb.ClassifyRequest(
                images=[pb.Image(encoded=images[i]) for i in group],
                model=cfg.model or "",
                model_version=cfg.model_version,
            )
            if cfg.top_k is not None:
                req.top_k = cfg.top_k
            out.append(Payload(req.SerializeToString()))
        return out
    if target == "http":
        query = "&".join(
            f"{name}={value}"
            for name, value in (("top_k", cfg.top_k), ("model", cfg.model), ("version", cfg.model_version or None))
            if value is not None
        )
        path = "/predict" + (f"?{query}" if query else "")
        size = sum(len(im) for im in images) / len(images) * k
        out = []
        for gi, group in enumerate(_groups(len(images), k, int(PAYLOAD_BYTES_BUDGET / max(1.0, size)) * k, offset)):
            if k == 1:
                image = images[group[0]]
                out.append(Payload(image, _content_type(image), path=path))
                continue
            boundary = f"cnnserveloadtest{gi:08d}"
            parts = []
            for j, i in enumerate(group):
                parts.append(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{j}"\r\n'
                    f"Content-Type: {_content_type(images[i])}\r\n\r\n".encode()
                    + images[i]
                    + b"\r\n"
                )
            body = b"".join(parts) + f"--{boundary}--\r\n".encode()
            out.append(Payload(body, f"multipart/form-data; boundary={boundary}", path=path))
        return out
    assert tensor is not None
    image_bytes = int(np.prod(tensor.shape[1:])) * 4
    groups = _groups(len(tensor), k, PAYLOAD_BYTES_BUDGET // image_bytes, offset)
    if target == "grpc-v2":
        from tritonclient.grpc import service_pb2 as tpb

        out = []
        for group in groups:
            x = np.ascontiguousarray(tensor[group])
            req = tpb.ModelInferRequest(model_name=model, model_version=cfg.model_version)
            inp = req.inputs.add()
            inp.name, inp.datatype = "input", "FP32"
            inp.shape.extend(x.shape)
            req.raw_input_contents.append(x.tobytes())
            out.append(Payload(req.SerializeToString()))
        return out
    # http-v2: JSON header + binary tensor (Triton binary tensor data extension), binary outputs.
    path = f"/v2/models/{model}" + (f"/versions/{cfg.model_version}" if cfg.model_version else "") + "/infer"
    out = []
    for group in groups:
        x = np.ascontiguousarray(tensor[group])
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            },
            separators=(",", ":"),
        ).encode()
        out.append(
            Payload(
                header + x.tobytes(),
                "application/octet-stream",
                {"Inference-Header-Content-Length": str(len(header))},
                path=path,
            )
        )
    return out


def raw_http_request(payload: Payload, host: str, headers: dict | None = None) -> bytes:
    head = [f"POST {payload.path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(payload.body)}"]
    if payload.content_type:
        head.append(f"Content-Type: {payload.content_type}")
    head += [f"{k}: {v}" for k, v in {**payload.extra_headers, **(headers or {})}.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload.body
