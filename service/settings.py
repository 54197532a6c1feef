"""Every knob of the server, in one place.

Each field is settable as a ``cnnserve serve`` flag (``--max-batch-size 32``) and as an
environment variable with the ``CNNSERVE_`` prefix (``CNNSERVE_MAX_BATCH_SIZE=32``); flags win.
List fields take a comma-separated string in the environment (``CNNSERVE_PROVIDERS=cpu``).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: The folder that holds the ``service`` package: a checkout (or editable install), where the
#: bundled ``models/`` and the default ``../shared`` data sit whatever the current folder is.
INSTALL_ROOT = Path(__file__).resolve().parent.parent

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
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="How models change while serving (README: Model control). none: what start-up found, "
        "until exit. poll: the repository is read again every --repository-poll-seconds; new, changed and "
        "removed versions are loaded or unloaded, each swapped in only once loaded and warmed. explicit: "
        "only --load-model models at start-up, then the repository API's load and unload (off otherwise). "
        "With several front ends every process swaps together, the device executor included.",
    )
    repository_poll_seconds: float = Field(
        15.0, gt=0.0, description="Seconds between two reads of the model repository (--model-control-mode poll)."
    )
    load_model: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="With --model-control-mode explicit: a model to load at start-up (repeat the flag, or "
        "a comma-separated list; * loads every model). Others wait for a load request.",
        json_schema_extra={"repeatable": True},
    )

    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["cuda", "cpu"],  # validated into ONNX Runtime's full names
        description="ONNX Runtime execution providers in order of preference (cuda, cpu, tensorrt or full "
        "names). CUDA absent: one warning, then CPU; see --require-gpu.",
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description="Which variant of each model to load: model.onnx (fp32), model.int8.onnx or model.fp16.onnx "
        "from its version folder. A variant is checked against fp32 at load (top-1 agreement on the "
        "check_inputs.npz beside the model). auto: int8 on the CPU provider where it passes and is faster "
        "here at batch 1 and max_batch_size, else fp32; fp32 on CUDA and where the variant is absent. An "
        "explicit precision whose file is absent, or that fails its check, stops the server.",
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
    refuse_non_finite: bool = Field(
        False,
        description="Refuse Open Inference Protocol input tensors that hold NaN or +-Inf (400 / "
        "INVALID_ARGUMENT). Off by default, as in Triton, KServe and MLServer: benchmark tools such as "
        "perf_analyzer send random FP32 bits, NaN included; the answers to such inputs may hold NaN, "
        "written as null in JSON.",
    )

    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest HTTP body or gRPC message.")
    max_images_per_request: int = Field(256, ge=1, description="Most images in one request.")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1024,
        description="Largest decoded image (width x height) before it is refused, against decompression bombs. "
        "Sequential JPEGs count at the reduced scale they are decoded at (their header at most 4x this).",
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
        "connection closed past it (stalled uploads); for a gRPC call, from its headers to its request "
        "message: DEADLINE_EXCEEDED.",
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
    max_connections_per_client: int = Field(
        256,
        ge=0,
        description="Most HTTP connections open at once from one client address (0: no cap), so that one "
        "client cannot hold every connection slot; past it a new connection is answered 503 and closed. "
        "Behind a proxy that sends every client from one address, raise it to max_connections or set 0.",
    )
    grpc_max_calls_per_client: int = Field(
        256,
        ge=0,
        description="Most gRPC calls in progress at once from one client address on one front end (0: no cap), "
        "so that one client opening many connections cannot hold every call slot (max_connections); past it a "
        "call is answered RESOURCE_EXHAUSTED at once. The host's own loopback address (an Envoy sidecar) is not "
        "counted. Behind another proxy that sends every client from one address, raise it or set 0.",
    )
    grpc_max_concurrent_streams: int = Field(
        2048,
        ge=1,
        description="Most gRPC calls open at once on one HTTP/2 connection, advertised to clients "
        "(MAX_CONCURRENT_STREAMS); streams past it are refused (REFUSED_STREAM -> UNAVAILABLE). A stream "
        "counts until the server has freed it, which a busy server does tens of calls late: keep it well "
        "above max_connections (the call slots), so that overload is answered RESOURCE_EXHAUSTED by the "
        "call slots and the queue instead (HTTP/2 rapid reset is bounded by grpc_max_early_resets).",
    )
    grpc_min_ping_interval_seconds: float = Field(
        10.0,
        gt=0,
        description="Shortest interval between a client's HTTP/2 keepalive pings the gRPC port accepts, with "
        "or without calls in progress (gRPC's own floor for client keepalive); a client pinging more often "
        "gets GOAWAY too_many_pings after 2 strikes (ping flood). grpc-core's default, 5 min and never "
        "without calls, sent a client with a 10-30 s keepalive (behind cloud load balancers) GOAWAY.",
    )
    grpc_max_early_resets: int = Field(
        200,
        ge=1,
        description="Most gRPC calls one client address may cancel before their request message "
        "arrives, per 10 s; past it the connection is shut down and the address kept off the gRPC port for "
        "grpc_penalty_seconds (HTTP/2 rapid reset; unary clients send the message with the headers).",
    )
    grpc_penalty_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a client address past its early-reset budget is kept off the gRPC port "
        "(its new connections dropped, its open ones shut down); doubled each time the same address is "
        "boxed again, up to 30 times this.",
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
        "starts another. With one process: /healthz answers 503 while a batch has been out this long, so the "
        "liveness probe restarts the container. The slowest legitimate batch is far shorter: 1024 images on "
        "one CPU thread took 0.8 s here, a first cuDNN EXHAUSTIVE plan a few seconds.",
    )
    boot_failure_limit: int = Field(
        5,
        ge=1,
        le=1000,
        description="With several processes: a process that fails this many times in a row before it is "
        "ready stops the whole server (exit 1, the cause logged), so an orchestrator restarts it.",
    )

    # Security (service/security/; README "Secure it"). Defaults: plaintext and open, for a local start.
    tls_cert_file: str = Field(
        "",
        description="PEM certificate chain for TLS on both ports (with --tls-key-file); empty: plaintext. "
        "Checked for changes every --tls-reload-seconds; new handshakes get the new certificate.",
    )
    tls_key_file: str = Field("", description="PEM private key of --tls-cert-file.")
    tls_client_ca_file: str = Field(
        "",
        description="PEM CA certificates for mutual TLS: clients must present a certificate signed by one "
        "of them, or the handshake fails (both ports). Empty: no client certificates asked.",
    )
    tls_reload_seconds: float = Field(
        10.0, ge=0.0, description="How often the TLS files are checked for changes (0: never reloaded)."
    )
    restricted_apis: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated access groups that need a key (Authorization: Bearer KEY or X-API-Key: "
        "KEY; the same gRPC metadata): health, metadata, inference, explain, statistics, model-repository, "
        "metrics, or all (everything but health). Keys come from --access-keys-file and the "
        "CNNSERVE_ACCESS_KEYS environment variable. Empty: everything open.",
    )
    access_keys_file: str = Field(
        "",
        description="File of access keys, one per line: KEY (every group) or GROUP[,GROUP...]:KEY; # starts "
        "a comment. Keys are never logged; keep the file readable by the server only.",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    tracing: bool = Field(
        False,
        description="OpenTelemetry traces of inference, explanation and v2 requests, configured by the "
        'standard OTEL_* variables (README "Tracing"); needs the tracing extra. Off: no cost.',
    )

    @field_validator("restricted_apis", mode="before")
    @classmethod
    def _split_groups(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip().lower() for v in value.split(",") if v.strip()]
        return value

    @field_validator("restricted_apis")
    @classmethod
    def _known_groups(cls, value: list[str]) -> list[str]:
        from service.security.groups import expand_groups

        return expand_groups(value)

    @field_validator("model_repository", "samples_data")
    @classmethod
    def _defaults_from_the_installation(cls, value: str, info: typing.Any) -> str:
        """A default path (relative) that is not there from the current folder is looked up from
        the installation's root, so `cd /tmp && cnnserve serve` serves the bundled model. Other
        paths are taken as given (relative to the current folder)."""
        if value == cls.model_fields[info.field_name].default and not Path(value).exists():
            there = INSTALL_ROOT / value
            if there.exists():
                return str(there.resolve())
        return value

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: object) -> object:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [PROVIDER_ALIASES.get(str(v).lower(), str(v)) for v in value]
        return value

    @field_validator("load_model", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        items = [value] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            return [name.strip() for item in items for name in str(item).split(",") if name.strip()]
        return value

    @field_validator("load_model")
    @classmethod
    def _star_alone(cls, value: list[str]) -> list[str]:
        if "*" in value and len(value) > 1:
            raise ValueError("* (every model) must be the only model named")
        return value

    @model_validator(mode="after")
    def _load_model_needs_explicit(self) -> Settings:
        if self.load_model and self.model_control_mode != "explicit":
            raise ValueError(
                "--load-model (CNNSERVE_LOAD_MODEL) needs --model-control-mode explicit; with "
                f"{self.model_control_mode} every model of the repository is loaded"
            )
        return self

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
    if field == "load_model":
        return "model folder names (repeat the flag, or separate them with commas), or *"
    if field == "providers":
        return "a comma-separated list of cuda, cpu, tensorrt (or full ONNX Runtime provider names)"
    if field == "restricted_apis":
        from service.security.groups import GROUPS

        return "a comma-separated list of " + ", ".join((*GROUPS, "all"))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # workers: 1-256 or auto
        parts = typing.get_args(annotation)
        return ", or ".join(_kind_in_words(arg, getattr(arg, "__metadata__", ())) for arg in parts)
    return _kind_in_words(annotation, info.metadata)


def _kind_in_words(annotation: object, metadata: typing.Iterable[object]) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return " or ".join(str(v) for v in typing.get_args(annotation))
    kinds: dict[object, str] = {int: "an integer", float: "a number"}
    kind = kinds.get(annotation, "a string")
    bounds = []
    # A Field() inside Annotated keeps its bounds in its own metadata (annotated_types.Ge, ...).
    for m in [c for each in metadata for c in (getattr(each, "metadata", None) or [each])]:
        for attr, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{word} {getattr(m, attr)}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def explain_error(error: ValidationError, from_flags: typing.Collection[str] = ()) -> str:
    """A settings error for people: per bad value, the flag and environment variable that set it,
    the value given and what is allowed (pydantic's own text names internal fields and links
    to its website)."""
    lines = []
    errors = error.errors(include_url=False)
    fields = [str(err["loc"][0]) if err["loc"] else "" for err in errors]
    for field, err in zip(fields, errors):
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be", "should be")
        if field not in Settings.model_fields:
            lines.append(f"{field or 'settings'}: {msg}")
            continue
        if fields.count(field) > 1:  # one error per member of a union (workers: a number or auto): one line
            if any(line.startswith((f"{flag_name(field)} ", f"{env_name(field)}=")) for line in lines):
                continue
            msg = "not a valid value"
        value = err.get("input")
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        if field in from_flags:
            given = f"{flag_name(field)} {shown} (environment variable {env_name(field)})"
        else:
            given = f"{env_name(field)}={shown} (flag {flag_name(field)})"
        lines.append(f"{given}: {msg}; allowed: {allowed_values(field)}")
    return "\n".join(lines)
