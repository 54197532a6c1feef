"""What one server process gets from the security settings: the HTTP SSL context and access
middleware, the gRPC credentials and interceptor, the TLS file watcher, and the start-up line
that says what is encrypted and what is open."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, Protocol

import grpc

from service.security.access import AccessConfigError, AccessPolicy, AccessSettings, GrpcAccess, HttpAccess
from service.security.groups import GROUPS
from service.security.tls import TlsConfigError, TlsFiles

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from service.metrics import Metrics


class SecurityError(ValueError):
    """Security settings the server cannot start with; its message is the one line shown."""


class SecuritySettings(AccessSettings, Protocol):
    """The settings Security reads (see AccessSettings for why not service.settings.Settings)."""

    tls_cert_file: str
    tls_key_file: str
    tls_client_ca_file: str
    tls_reload_seconds: float


class Security:
    def __init__(self, settings: SecuritySettings) -> None:
        try:
            self.tls = (
                TlsFiles(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
                if settings.tls_cert_file or settings.tls_key_file or settings.tls_client_ca_file
                else None
            )
            self.access = AccessPolicy.from_settings(settings)
        except (TlsConfigError, AccessConfigError) as e:
            raise SecurityError(str(e)) from None
        self.reload_seconds = settings.tls_reload_seconds

    @property
    def http_ssl(self) -> ssl.SSLContext | None:
        return self.tls.http_context if self.tls else None

    def http_app(self, app: ASGIApp, metrics: Metrics) -> ASGIApp:
        return HttpAccess(app, self.access, metrics) if self.access.restricted else app

    def grpc_interceptors(self, metrics: Metrics) -> list[grpc.aio.ServerInterceptor]:
        return [GrpcAccess(self.access, metrics)] if self.access.restricted else []

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        return self.tls.grpc_credentials() if self.tls else None

    def start_watching(self) -> asyncio.Task[None] | None:
        if self.tls is None or self.reload_seconds <= 0:
            return None
        return asyncio.create_task(self.tls.watch(self.reload_seconds))

    def describe(self) -> str:
        """One line: TLS or not, which groups are open and which need a key (no key in it)."""
        if self.tls is None:
            tls = "TLS off (plaintext HTTP and gRPC)"
        else:
            tls = "TLS on for HTTP and gRPC" + (
                " with mutual TLS (client certificates required)" if self.tls.mutual else ""
            )
        open_groups = [g for g in GROUPS if g not in self.access.restricted]
        keyed = [g for g in GROUPS if g in self.access.restricted]
        return (
            f"security: {tls}; open to anyone who reaches the ports: {', '.join(open_groups) or 'nothing'}; "
            f"key required: {', '.join(keyed) or 'nothing'} ({len(self.access.keys)} key(s) loaded)"
        )
