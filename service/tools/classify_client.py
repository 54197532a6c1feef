"""``cnnserve classify``: send image files to a running server (gRPC Classify or HTTP /predict),
in plaintext or TLS, with an access key when the server asks for one (service.security.client)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc

from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.security.client import ClientSecurity


def classify_grpc(
    target: str,
    images: list[bytes],
    top_k: int | None,
    model: str | None,
    timeout: float,
    security: ClientSecurity = ClientSecurity(),  # frozen: a shared default is safe
) -> dict[str, Any]:
    request = pb.ClassifyRequest(images=[pb.Image(encoded=data) for data in images], model=model or "")
    if top_k is not None:
        request.top_k = top_k
    with security.grpc_channel(target) as channel:
        response = pb_grpc.ClassifierStub(channel).Classify(request, timeout=timeout, metadata=security.grpc_metadata())
    return {
        "model": response.model,
        "model_version": response.model_version,
        "results": [
            {"predictions": [{"label": p.label, "index": p.index, "probability": p.probability} for p in r.predictions]}
            for r in response.results
        ],
    }


def classify_http(
    target: str,
    files: list[Path],
    top_k: int | None,
    model: str | None,
    timeout: float,
    security: ClientSecurity = ClientSecurity(),  # frozen: a shared default is safe
) -> dict[str, Any]:
    boundary = uuid.uuid4().hex
    body = b""
    for f in files:
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{f.name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + f.read_bytes()
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    query = "&".join(f"{k}={v}" for k, v in (("top_k", top_k), ("model", model)) if v is not None)
    url = f"{security.scheme}://{target}/predict" + (f"?{query}" if query else "")
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}", **security.headers()}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=security.ssl_context()) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        try:
            detail = json.loads(detail)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        raise RuntimeError(f"HTTP {e.code}: {detail}") from None


def name_files(message: str, files: list[Path]) -> str:
    """The server numbers a request's images ("image 1: not an image ..."): say which file."""

    def file_name(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return f"{files[i]}:" if 0 <= i < len(files) else m.group(0)

    return re.sub(r"\bimage (\d+)(?: \([^)]*\))?:", file_name, message)  # multipart: "image 1 (name):"


def main(args: argparse.Namespace) -> int:
    target = args.target or ("localhost:8000" if args.http else "localhost:8001")
    try:
        security = ClientSecurity.from_args(args)
    except (ValueError, OSError) as e:
        print(f"cnnserve classify: {e}", file=sys.stderr)
        return 2
    try:
        if args.http:
            answer = classify_http(target, args.images, args.top_k, args.model, args.timeout, security)
        else:
            images = [p.read_bytes() for p in args.images]
            answer = classify_grpc(target, images, args.top_k, args.model, args.timeout, security)
    except OSError as e:
        print(f"cnnserve classify: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"cnnserve classify: {e.code().name}: {name_files(e.details() or '', args.images)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"cnnserve classify: {name_files(str(e), args.images)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"model {answer['model']} version {answer['model_version']}")
    for path, result in zip(args.images, answer["results"]):
        top = ", ".join(f"{p['label']} {100 * p['probability']:.1f}%" for p in result["predictions"])
        print(f"{path}: {top}")
    return 0
