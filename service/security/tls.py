"""TLS on both ports from PEM files, reloaded when the files change.

HTTP: one ``ssl.SSLContext`` (TLS 1.2 minimum, ECDHE with AES-GCM or ChaCha20 for TLS 1.2,
TLS 1.3's own suites, ALPN http/1.1), handed to the listener once. A reload loads the new
certificate chain *into that same context*: OpenSSL copies a context's certificate into each
connection when the connection is made, so new handshakes get the new certificate and open
connections keep theirs.

gRPC: ``grpc.dynamic_ssl_server_credentials``, whose fetcher grpc calls before each new
handshake; it answers the new configuration once after a reload and None (unchanged) otherwise.
gRPC negotiates HTTP/2 with ALPN ``h2`` itself, and its TLS minimum is 1.2.

Mutual TLS (``--tls-client-ca-file``): both ports require a client certificate signed by one of
those CAs, so a client without one (or with another) fails in the handshake, before any request.
A rotated CA file adds its certificates to the HTTP side's trust (OpenSSL cannot remove them
from a live context) and replaces them on the gRPC side; restart to drop a CA from HTTP.

Files are replaced atomically by Kubernetes (a Secret volume swaps a symlink); a pair read while
half-written fails the check that the key matches the certificate and is retried at the next
check, the old pair staying in use.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("cnnserve.tls")

# Mozilla's "intermediate" TLS 1.2 suites (forward secrecy, AEAD only); TLS 1.3 suites are
# OpenSSL's defaults, all of them modern.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


class TlsConfigError(ValueError):
    """TLS files that cannot be used; said in one line at start."""


@dataclass(frozen=True)
class Material:
    cert: bytes
    key: bytes
    ca: bytes | None


class TlsFiles:
    """The certificate, key and client CA files, their last good contents, and the contexts
    built from them."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str = "") -> None:
        if bool(cert_file) != bool(key_file):
            raise TlsConfigError("--tls-cert-file and --tls-key-file go together: give both or neither")
        if ca_file and not cert_file:
            raise TlsConfigError("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.material = self._read_checked()
        self.generation = 0  # bumped by each reload; the gRPC fetcher compares it
        self._grpc_generation = 0
        self._refused: Material | None = None  # the last contents that could not be used
        self.http_context = self._new_context()
        self._load_into(self.http_context)

    @property
    def mutual(self) -> bool:
        return bool(self.ca_file)

    def _read(self) -> Material:
        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise TlsConfigError(f"cannot read {what} {path}: {e.strerror}") from None

        ca = read(self.ca_file, "--tls-client-ca-file") if self.ca_file else None
        return Material(read(self.cert_file, "--tls-cert-file"), read(self.key_file, "--tls-key-file"), ca)

    def _read_checked(self) -> Material:
        """The files' contents, loaded once into a scratch context, which checks that they are
        PEM, that the key matches the certificate and that the CA file holds certificates."""
        before = self._read()
        self._load_into(self._new_context())
        after = self._read()
        if after != before:  # replaced while we looked: the caller tries again later
            raise TlsConfigError("the TLS files changed while being read")
        return before

    def _new_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHERS)
        ctx.set_alpn_protocols(["http/1.1"])
        if self.ca_file:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as e:
            raise TlsConfigError(
                f"--tls-cert-file {self.cert_file} / --tls-key-file {self.key_file}: not a PEM certificate "
                f"chain and its matching private key ({e.reason or e})"
            ) from None
        except OSError as e:
            raise TlsConfigError(f"cannot read the TLS certificate or key: {e.strerror}") from None
        if self.ca_file:
            try:
                ctx.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, OSError) as e:
                raise TlsConfigError(f"--tls-client-ca-file {self.ca_file}: no PEM CA certificates ({e})") from None

    def reload_if_changed(self) -> bool:
        """Reload when a file's contents changed and the new set is usable; True if reloaded."""
        try:
            current = self._read()
            if current == self.material or current == self._refused:
                return False
            material = self._read_checked()
            self._load_into(self.http_context)
        except TlsConfigError as e:
            self._refused = current if "current" in locals() else None  # said once per content, not per check
            log.warning("TLS files changed but cannot be used yet (the old certificate stays): %s", e)
            return False
        self.material = material
        self.generation += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return True

    async def watch(self, interval: float) -> None:
        """Check the files every ``interval`` seconds (reading three small files costs nothing)."""
        while True:
            await asyncio.sleep(interval)
            self.reload_if_changed()

    # ---- gRPC ---------------------------------------------------------------------------------
    def _grpc_config(self) -> grpc.ServerCertificateConfiguration:
        m = self.material
        return grpc.ssl_server_certificate_configuration([(m.key, m.cert)], root_certificates=m.ca)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before every new handshake: cheap when nothing changed.
        generation = self.generation
        if generation == self._grpc_generation:
            return None
        self._grpc_generation = generation
        return self._grpc_config()

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_config(), self._fetch, require_client_authentication=self.mutual
        )
