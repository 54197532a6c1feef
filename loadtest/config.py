"""What one load test is: its configuration, defaults and validation. No heavy imports here:
``cnnserve --help`` builds the ``loadtest`` parser from this module and ``loadtest.arguments``."""

from __future__ import annotations

import time
from dataclasses import dataclass

TARGETS = ("grpc", "grpc-v2", "http", "http-v2")
DEFAULT_ADDRESS = {
    "grpc": "127.0.0.1:8001",
    "grpc-v2": "127.0.0.1:8001",
    "http": "127.0.0.1:8000",
    "http-v2": "127.0.0.1:8000",
}
# The server's default ports: a gRPC target on DEFAULT_GRPC_PORT has its metrics on the same host's
# DEFAULT_HTTP_PORT. Any other gRPC port needs --metrics-address (gRPC does not tell the HTTP port).
DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT = "8001", "8000"
NO_METRICS = ("", "none", "off")
DEFAULT_MODEL = "cifar10"
DEFAULT_MODEL_FILE = "models/cifar10/1/model.onnx"
PERCENTILES = (50, 90, 95, 99)

now = time.monotonic  # CLOCK_MONOTONIC: one clock for every process of the run


class LoadTestError(RuntimeError):
    """Set-up failed (no server, a target the server lacks, bad images): nothing was measured."""


@dataclass
class LoadConfig:
    target: str = "grpc"
    address: str | None = None  # host:port; default by target
    concurrency: int = 1  # closed loop callers (all processes together)
    rate: float | None = None  # open loop requests/s (all processes together)
    duration: float | None = None  # measured seconds (default 10 unless requests is given)
    requests: int | None = None  # measured requests instead of a duration
    warmup: float = 1.0
    processes: int = 1
    images_per_request: int = 1
    images: str | None = None  # folder or .tar(.gz) of JPEG/PNG; None: generated
    generated: int = 64  # generated images when no folder is given
    max_images: int = 4096  # at most this many files are read from --images
    model: str | None = None  # Classify: empty = server default; v2: cifar10
    model_version: str = ""
    model_file: str = DEFAULT_MODEL_FILE  # preprocessing for the v2 tensors
    top_k: int | None = None
    timeout: float = 30.0
    max_outstanding: int = 10_000  # open loop, per process
    grpc_channels: int = 1  # per process (each its own TCP connection)
    http_client: str = "raw"  # raw (httptools) or aiohttp
    metrics_address: str | None = None  # HOST:PORT or URL of /metrics; None: derived; "none": skip
    # TLS and access key (service.security.client's flags); the key itself is read from a file or
    # the environment by each process, never carried here.
    tls: bool = False
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    access_key_file: str | None = None
    seed: int = 0
    progress: bool = True
    uvloop: bool = True

    def security(self):
        """The client side of TLS and the access key (service.security.client.ClientSecurity)."""
        from service.security.client import ClientSecurity

        return ClientSecurity.from_options(self.tls, self.cacert, self.cert, self.key, self.access_key_file)

    @property
    def scheme(self) -> str:
        return "https" if self.tls or self.cacert or self.cert else "http"

    def resolved_address(self) -> str:
        return self.address or DEFAULT_ADDRESS[self.target]

    @property
    def protocol(self) -> str:
        """``grpc`` or ``http``: the ``protocol`` label of the server's request counter."""
        return "grpc" if self.target.startswith("grpc") else "http"

    def resolved_metrics_url(self) -> str | None:
        """The server's /metrics URL, or None when there is none to scrape (see ``metrics_skip_reason``).

        --metrics-address HOST:PORT (or a full URL) wins; HTTP targets: the target itself; gRPC
        targets: the same host's port 8000 when the target is the default gRPC port 8001, else None."""
        given = self.metrics_address
        if given is not None:
            given = given.strip()
            if given.lower() in NO_METRICS:
                return None
            if "://" not in given:
                return f"{self.scheme}://{given}/metrics"
            scheme, _, rest = given.partition("://")
            return given if "/" in rest else f"{scheme}://{rest}/metrics"
        address = self.resolved_address()
        if self.protocol == "http":
            return f"{self.scheme}://{address}/metrics"
        host, _, port = address.rpartition(":")
        return f"{self.scheme}://{host}:{DEFAULT_HTTP_PORT}/metrics" if port == DEFAULT_GRPC_PORT else None

    def metrics_skip_reason(self) -> str:
        """Why ``resolved_metrics_url`` is None, in words a user can act on."""
        if self.metrics_address is not None:
            return "scraping disabled (--metrics-address none)"
        return (
            f"gRPC target {self.resolved_address()} is not on the default port {DEFAULT_GRPC_PORT}, so its "
            "HTTP port is unknown: pass --metrics-address HOST:HTTP_PORT to read the server's batching figures"
        )

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    def validate(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r} (one of {', '.join(TARGETS)})")
        if self.processes < 1:
            raise ValueError("--processes must be >= 1")
        if self.rate is not None:
            if not self.rate > 0:
                raise ValueError("--rate must be > 0")
        elif self.concurrency < self.processes:
            raise ValueError(f"--concurrency {self.concurrency} is less than --processes {self.processes}")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be > 0")
        if self.requests is not None and self.requests < self.processes:
            raise ValueError("--requests must be >= --processes")
        if self.warmup < 0:
            raise ValueError("--warmup must be >= 0")
        if self.images_per_request < 1:
            raise ValueError("--images-per-request must be >= 1")
        if self.http_client not in ("raw", "aiohttp"):
            raise ValueError("--http-client is raw or aiohttp")
        if bool(self.cert) != bool(self.key):
            raise ValueError("--cert and --key go together")
        if self.grpc_channels < 1 or self.max_outstanding < 1 or self.timeout <= 0:
            raise ValueError("--grpc-channels, --max-outstanding and --timeout must be positive")
