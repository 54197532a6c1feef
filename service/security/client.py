"""The client side of TLS and access keys, shared by ``cnnserve classify`` and ``cnnserve loadtest``:
the same flags, the same SSL context for HTTP, the same gRPC channel credentials and key metadata.

The key is read from ``--access-key-file`` or the ``CNNSERVE_ACCESS_KEY`` environment variable,
never from a flag, which anyone could read in ``ps``.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # grpc is imported when a channel is made: `cnnserve --help` builds these flags
    import grpc

KEY_ENV = "CNNSERVE_ACCESS_KEY"


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CAs")
    parser.add_argument("--cacert", metavar="PEM", default=None, help="trust this CA file (implies --tls)")
    parser.add_argument("--cert", metavar="PEM", default=None, help="client certificate chain for mutual TLS")
    parser.add_argument("--key", metavar="PEM", default=None, help="private key of --cert")
    parser.add_argument(
        "--access-key-file",
        metavar="FILE",
        default=None,
        help=f"file holding the access key sent as X-API-Key (default: the {KEY_ENV} environment variable)",
    )


@dataclass(frozen=True)
class ClientSecurity:
    tls: bool = False
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    access_key: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ClientSecurity:
        """From the flags of add_arguments; a missing file is an OSError naming it."""
        return cls.from_options(args.tls, args.cacert, args.cert, args.key, args.access_key_file)

    @classmethod
    def from_options(
        cls, tls: bool, cacert: str | None, cert: str | None, key: str | None, access_key_file: str | None
    ) -> ClientSecurity:
        if bool(cert) != bool(key):
            raise ValueError("--cert and --key go together")
        access_key = os.environ.get(KEY_ENV) or None
        if access_key_file:
            access_key = Path(access_key_file).read_text().strip()
        return cls(bool(tls or cacert or cert), cacert, cert, key, access_key)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(cafile=self.cacert)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.access_key} if self.access_key else {}

    def grpc_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", self.access_key),) if self.access_key else ()

    def grpc_credentials(self) -> grpc.ChannelCredentials | None:
        import grpc

        if not self.tls:
            return None

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.cacert), read(self.key), read(self.cert))

    def grpc_channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.Channel:
        import grpc

        creds = self.grpc_credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, creds, options=options)

    def grpc_aio_channel(self, target: str, options: Sequence[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        import grpc

        creds = self.grpc_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, creds, options=options)
