"""OpenAPI schemas of the HTTP API's bodies, for /docs and client generators only.

Routes answer with ready-made ``Response`` objects (orjson, no pydantic on the hot path), so these
models document the wire format without validating it; tests/test_openapi.py checks that real
answers fit them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    """Every error answer: 4xx and 5xx, /predict and /v2 alike."""

    error: str = Field(description="What went wrong, for people", examples=["top_k must be an integer from 1 to 10"])


class Prediction(BaseModel):
    label: str = Field(examples=["cat"])
    index: int = Field(description="class index in the model's output", examples=[3])
    probability: float = Field(description="softmax probability", examples=[0.71])


class ImageResult(BaseModel):
    predictions: list[Prediction] = Field(description="the top_k classes, most probable first")
    file: str | None = Field(None, description="multipart bodies: the filename of the part this result is for")


class PredictResponse(BaseModel):
    model: str = Field(examples=["cifar10"])
    model_version: str = Field(examples=["1"])
    results: list[ImageResult] = Field(description="one per image, in request order")


class Attribution(BaseModel):
    method: str = Field(examples=["occlusion"])
    class_index: int = Field(description="the explained class", examples=[3])
    label: str = Field(examples=["cat"])
    height: int = Field(examples=[32])
    width: int = Field(examples=[32])
    values: list[list[float]] = Field(
        description="height rows of width values on the model's input; positive where hiding the pixels "
        "lowers the class's probability"
    )


class Layer(BaseModel):
    name: str = Field(examples=["conv1"])
    shape: list[int] = Field(description="one image's activation", examples=[[32, 32, 32]])
    description: str = Field(description="what the layer does, in one sentence")
    maps: list[str] | None = Field(None, description="per-channel greyscale PNGs, base64 (conv1, conv2, pool)")
    maxima: list[float] | None = Field(None, description="each map's maximum (its white)")
    filters: list[str] | None = Field(None, description="conv1 only: its filters as 3x3 RGB PNGs, base64")
    values: list[float] | None = Field(None, description="the activations (fc3, fc4)")


class ImageExplanation(BaseModel):
    predictions: list[Prediction] = Field(description="the top_k classes, most probable first")
    attribution: Attribution
    layers: list[Layer] = Field(description="conv1, conv2, pool, fc3, fc4; empty without layers.onnx")


class ExplainResponse(BaseModel):
    model: str = Field(examples=["cifar10"])
    model_version: str = Field(examples=["1"])
    results: list[ImageExplanation] = Field(description="one per image, in request order")


class PredictJsonBody(BaseModel):
    images: list[str] = Field(description="base64 of each encoded image (JPEG, PNG, ...)", min_length=1)
    top_k: int | None = Field(None, ge=1, le=10, description="labels per image (default 5)")
    model: str | None = Field(None, description="model name (default: the first in the repository)")
    model_version: str | None = Field(None, description="model version (default: the highest)")


class Liveness(BaseModel):
    status: str = Field(examples=["live"], description='"live", or "hung" (503)')
    reason: str | None = Field(None, description="Why not live: a batch out past --hang-timeout-seconds (one process)")


class ModelState(BaseModel):
    name: str
    version: str
    provider: str = Field(description="ONNX Runtime execution provider", examples=["CPUExecutionProvider"])
    precision: str = Field(description="the precision variant that answers: fp32, int8 or fp16", examples=["int8"])
    file: str = Field(description="its file in the version folder", examples=["model.int8.onnx"])
    precision_choice: dict[str, Any] | None = Field(
        None,
        description="why this variant answers, measured at load on this machine: requested, precision, reason, "
        "candidate, check_images, check_agreement (top-1 agreement with fp32 on the check inputs), threshold, "
        "timing (per batch size: fp32_ms, variant_ms, speedup), cpu (model, arch, flags), seconds",
    )


class Readiness(BaseModel):
    status: str = Field(description="ready, or why not (loading, draining, grpc_unavailable)", examples=["ready"])
    models: list[ModelState]
    error: str | None = Field(None, description="only when not ready")


BINARY = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream"}

#: /predict's request body, hand-written because the route reads the body itself (one image, a
#: multipart form of images, or JSON), which FastAPI cannot infer.
PREDICT_REQUEST_BODY = {
    "required": True,
    "description": "One image as the body, several as multipart parts named `file`, or base64 in JSON.",
    "content": {
        "image/jpeg": {"schema": BINARY},
        "image/png": {"schema": BINARY},
        "application/octet-stream": {"schema": BINARY},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "array", "items": BINARY, "description": "one part per image"}},
                "required": ["file"],
            },
            "encoding": {"file": {"contentType": "image/*"}},
        },
        "application/json": {"schema": PredictJsonBody.model_json_schema()},
    },
}


def error_responses(*codes: int | str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses entries with the ``{"error": ...}`` schema for these status codes."""
    described = {
        400: "bad image or body",
        404: "unknown model, version or route",
        413: "body, image or image count too large",
        415: "unsupported Content-Type",
        422: "invalid parameter (top_k, timeout header)",
        429: "queue full: retry after Retry-After seconds",
        503: "not ready: loading or draining",
        504: "deadline passed before compute",
        "4XX": "client error",
        "5XX": "server error, not ready or deadline",
    }
    return {code: {"model": ErrorBody, "description": described.get(code, "error")} for code in codes}


_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "examples": ["input"]},
        "datatype": {"type": "string", "examples": ["FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}, "examples": [[1, 3, 32, 32]]},
        "parameters": {"type": "object", "description": "binary_data_size (binary tensor extension)"},
        "data": {"type": "array", "description": "values, flat or nested, row-major"},
    },
}

#: The Open Inference Protocol's inference request (JSON, or JSON followed by binary tensor data).
V2_INFER_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object", "description": "binary_data_output, timeout (microseconds)"},
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string", "examples": ["probabilities"]},
                                "parameters": {"type": "object", "description": "classification: k, binary_data"},
                            },
                        },
                    },
                },
            }
        },
        "application/octet-stream": {
            "schema": BINARY,
            "description": "JSON header of Inference-Header-Content-Length bytes, then the binary tensors",
        },
    },
}
