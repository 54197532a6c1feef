"""Test certificates (trustme): a CA, a server certificate for 127.0.0.1 and localhost, a client
certificate from that CA and one from another CA, written as PEM files, plus a served-certificate
probe that does a real TLS handshake."""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class TlsFiles:
    dir: Path
    ca_obj: trustme.CA
    ca: Path  # the CA clients trust (and the server's client CA for mutual TLS)
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    wrong_client_cert: Path  # signed by another CA
    wrong_client_key: Path

    def issue_server(self, name: str) -> tuple[bytes, bytes]:
        """A new (certificate chain, key) PEM pair for 127.0.0.1, from the same CA."""
        c = self.ca_obj.issue_cert("127.0.0.1", "localhost", common_name=name)
        return b"".join(p.bytes() for p in c.cert_chain_pems), c.private_key_pem.bytes()

    def replace_server(self, cert: bytes, key: bytes) -> None:
        """Replace the server's files the way Kubernetes does: each file appears whole at once."""
        for path, data in ((self.key, key), (self.cert, cert)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)


def make_tls(directory: Path) -> TlsFiles:
    directory.mkdir(parents=True, exist_ok=True)
    ca, other = trustme.CA(), trustme.CA()
    paths = {name: directory / f"{name}.pem" for name in ("ca", "cert", "key", "ccert", "ckey", "wcert", "wkey")}
    ca.cert_pem.write_to_path(paths["ca"])
    files = TlsFiles(directory, ca, paths["ca"], paths["cert"], paths["key"], paths["ccert"], paths["ckey"],
                     paths["wcert"], paths["wkey"])  # fmt: skip
    cert, key = files.issue_server("server-1")
    paths["cert"].write_bytes(cert)
    paths["key"].write_bytes(key)
    for issuer, c, k in ((ca, "ccert", "ckey"), (other, "wcert", "wkey")):
        client = issuer.issue_cert("client@example.com")
        paths[c].write_bytes(b"".join(p.bytes() for p in client.cert_chain_pems))
        client.private_key_pem.write_to_path(paths[k])
    return files


def handshake(port: int, ca: Path, alpn: str | None = None, cert: Path | None = None, key: Path | None = None):
    """(the server's certificate, DER; the ALPN protocol it chose) from one real TLS handshake."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols([alpn])
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        return s.getpeercert(binary_form=True), s.selected_alpn_protocol()
