"""Every knob of the server, in one place.

Each field is settable as a ``cnnserve serve`` flag (``--max-batch-size 32``) and as an
environment variable with the ``CNNSERVE_`` prefix (``CNNSERVE_MAX_BATCH_SIZE=32``); flags win.
List fields take a comma-separated string in the environment (``CNNSERVE_PROVIDERS=cpu``).
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROVIDER_ALIASES = {
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class Settings(BaseSettings):
    """cnnserve server settings (flags or CNNSERVE_* environment variables)."""

    model_config = SettingsConfigDict(env_prefix="CNNSERVE_", extra="forbid", validate_default=True)

    host: str = Field("0.0.0.0", description="Address both servers bind to.")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: pick a free one).")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port (0: pick a free one).")
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        "auto",
        description="Front-end processes that share the HTTP and gRPC ports and do all per-request work "
        "(protocol, decoding, top-k). One Python process answers ~2-3k requests/s whatever the hardware; "
        "more front ends use more cores. auto: one per core (with a GPU: one per core left after one per "
        "GPU); 1 with --executor worker: a single process, as simple as it gets.",
    )
    executor: Literal["auto", "device", "worker"] = Field(
        "auto",
        description="Where the models run with several workers. device: one executor process per device "
        "(each GPU, or the CPU) owns the sessions and one batch queue per model that every front end feeds "
        "through shared memory, so batches grow with the whole node's load. worker: each front end runs "
        "its own session with its own queue (no hand-over cost; N smaller batches). auto: device with a "
        "GPU, worker on the CPU (measured best there; see README).",
    )
    model_repository: str = Field(
        "models", description="Folder of models laid out as <name>/<version>/model.onnx (Triton style)."
    )

    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cuda", "cpu"],  # validated into ONNX Runtime's full names
        description="ONNX Runtime execution providers in order of preference (cuda, cpu, tensorrt or full "
        "names). CUDA absent: one warning, then CPU; see --require-gpu.",
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description="Which variant of each model to load: model.onnx (fp32), model.int8.onnx or model.fp16.onnx "
        "from its version folder. auto: int8 on the CPU provider, fp32 on CUDA, fp32 where the variant is "
        "absent. An explicit precision whose file is absent stops the server.",
    )
    require_gpu: bool = Field(False, description="Refuse to start unless the session really runs on CUDA.")
    cuda_device_id: int = Field(0, ge=0, description="CUDA device ordinal.")
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm search. EXHAUSTIVE finds the fastest kernel but "
        "benchmarks every new batch shape (slow first requests).",
    )
    gpu_mem_limit_mb: int = Field(0, ge=0, description="CUDA arena limit in MiB (0: no limit).")
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ORT intra-op threads. 0: one per usable core minus one (at least 1), leaving a "
        "core to the event loop that decodes and answers requests.",
    )
    inter_op_threads: int = Field(1, ge=1, description="ORT inter-op threads (the graph is a chain: 1 is right).")
    ort_allow_spinning: bool = Field(
        False,
        description="Let ORT's idle intra-op threads spin. Off by default: on a few cores spinning "
        "threads steal the CPU the event loop needs to decode and answer requests.",
    )

    max_batch_size: int = Field(
        64,
        ge=1,
        le=1024,
        description="Most images in one ORT run. Larger batches raise throughput until "
        "the runtime saturates, and raise per-batch latency.",
    )
    pad_batches: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Pad every batch to max_batch_size, so the runtime sees one input "
        "shape. On CUDA each change of batch size re-plans cuDNN's convolutions, which "
        "costs many times the GPU work of a whole padded batch; on the CPU padding costs "
        "compute in proportion. auto: pad on CUDA only.",
    )
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=10_000,
        description="How long the first queued image waits for company. 0 is greedy: "
        "whenever the runtime is free it takes everything queued, so a lone "
        "request never waits; batches still form under load.",
    )
    max_queue_size: int = Field(
        1024,
        ge=1,
        description="Most images waiting in one model's queue; more are rejected at once "
        "(HTTP 429 + Retry-After / RESOURCE_EXHAUSTED).",
    )
    default_top_k: int = Field(5, ge=1, le=10, description="top_k when a request gives none.")
    default_timeout_ms: float = Field(
        60_000.0,
        ge=0.0,
        description="Deadline for requests that carry none (0: none), so every request ends even if the "
        "client never gives up. HTTP clients set their own with the X-Request-Timeout-Ms header, gRPC clients "
        "with the call's deadline.",
    )

    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest HTTP body or gRPC message.")
    max_images_per_request: int = Field(256, ge=1, description="Most images in one request.")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1024,
        description="Largest decoded image (width x height) before it is refused, against decompression bombs.",
    )

    max_request_pixels: int = Field(
        4 * 4096 * 4096,
        ge=1024,
        description="Most pixels decoded for one request, summed over its images (JPEGs count at the reduced "
        "scale they are decoded at), so that many small files that each inflate to a large image cannot "
        "cost unbounded CPU: 413 / RESOURCE_EXHAUSTED past it.",
    )
    decode_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="Threads of the image decoding pool (0: the usable cores, at most 4). Decoding larger "
        "images runs there, never in asyncio's shared pool; a request waiting for a thread keeps its place.",
    )
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest HTTP request line plus headers, counted as the bytes arrive: 431 and the "
        "connection closed past it.",
    )
    max_headers: int = Field(100, ge=8, description="Most HTTP request headers: 431 and the connection closed past it.")
    header_timeout_seconds: float = Field(
        10.0,
        gt=0.0,
        description="Most seconds from a new connection (or a request's first byte) to the end of its "
        "headers: 408 and the connection closed past it (slow-header clients).",
    )
    body_timeout_seconds: float = Field(
        60.0,
        gt=0.0,
        description="Most seconds from the end of a request's headers to the end of its body: 408 and the "
        "connection closed past it (stalled uploads).",
    )
    keep_alive_timeout_seconds: float = Field(
        5.0, gt=0.0, description="Seconds an idle HTTP keep-alive connection stays open between requests."
    )
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Most request bytes held in memory across all requests at once (HTTP bodies, gRPC "
        "messages; each up to max_request_bytes): a request that would go past it is answered 503 + "
        "Retry-After / UNAVAILABLE at once.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Most concurrent HTTP connections (and requests in progress), and most gRPC calls in "
        "progress; past it HTTP requests are answered 503 and gRPC calls RESOURCE_EXHAUSTED at once.",
    )
    explain_concurrency: int = Field(
        2,
        ge=1,
        description="Explanations (/explain, Explain) computed at once. Each runs ~226 forward passes per "
        "image through the model's queue; a low limit keeps that queue free for /predict.",
    )
    explain_queue_size: int = Field(
        8,
        ge=0,
        description="Explanations waiting for a turn; more are refused at once (HTTP 429 + Retry-After / "
        "RESOURCE_EXHAUSTED).",
    )
    explain_max_images: int = Field(4, ge=1, description="Most images in one explanation request (more: 413).")

    samples_data: str = Field(
        "../shared/data/cifar10/cifar10-train-jpeg.tar.gz",
        description="CIFAR-10 data (image-folder .tar.gz or python archive) the page at / takes its ten "
        "sample images from: the first held-out validation image of each class. Absent: no samples.",
    )

    drain_seconds: float = Field(
        5.0,
        ge=0.0,
        description="After SIGTERM: seconds to keep serving while readiness reports false, so "
        "load balancers stop sending traffic before the listeners close.",
    )
    shutdown_timeout_seconds: float = Field(
        20.0, ge=0.0, description="After the drain: most seconds to finish admitted requests before exit."
    )

    hang_timeout_seconds: float = Field(
        30.0,
        gt=0.0,
        le=3600.0,
        description="With several processes: a process whose event loop, I/O thread or batch has not moved "
        "for this long is hung: the supervisor aborts it (SIGABRT, stacks in the log; SIGKILL 1 s later) and "
        "starts another. The slowest legitimate batch is far shorter: 1024 images on one CPU thread took "
        "0.8 s here, a first cuDNN EXHAUSTIVE plan a few seconds.",
    )
    boot_failure_limit: int = Field(
        5,
        ge=1,
        le=1000,
        description="With several processes: a process that fails this many times in a row before it is "
        "ready stops the whole server (exit 1, the cause logged), so an orchestrator restarts it.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [PROVIDER_ALIASES.get(str(v).lower(), str(v)) for v in value]
        return value

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one execution provider is needed")
        for v in value:
            if not v.endswith("ExecutionProvider"):
                raise ValueError(f"unknown execution provider {v!r} (try cuda, cpu, tensorrt)")
        return value


def flag_name(field: str) -> str:
    """The ``cnnserve serve`` flag of a settings field: ``max_batch_size`` → ``--max-batch-size``."""
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return f"CNNSERVE_{field.upper()}"


def allowed_values(field: str) -> str:
    """What a field accepts, in words, from its type and bounds."""
    info = Settings.model_fields[field]
    annotation = info.annotation
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(v) for v in typing.get_args(annotation))
    if annotation is bool:
        return "true or false"
    if field == "providers":
        return "a comma-separated list of cuda, cpu, tensorrt (or full ONNX Runtime provider names)"
    kinds: dict[object, str] = {int: "an integer", float: "a number"}
    kind = kinds.get(annotation, "a string")
    bounds = []
    for m in info.metadata:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{word} {getattr(m, attr)}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def explain_error(error: ValidationError, from_flags: typing.Collection[str] = ()) -> str:
    """A settings error for people: per bad value, the flag and environment variable that set it,
    the value given and what is allowed (pydantic's own text names internal fields and links
    to its website)."""
    lines = []
    for err in error.errors(include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
        if field not in Settings.model_fields:
            lines.append(f"{field or 'settings'}: {msg}")
            continue
        value = err.get("input")
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        if field in from_flags:
            given = f"{flag_name(field)} {shown} (environment variable {env_name(field)})"
        else:
            given = f"{env_name(field)}={shown} (flag {flag_name(field)})"
        lines.append(f"{given}: {msg}; allowed: {allowed_values(field)}")
    return "\n".join(lines)
