"""Access keys: which key opens which group, checked in constant time, on HTTP and gRPC.

A key is sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (HTTP headers, and the same
names as gRPC metadata, which tritonclient's ``headers=`` sends on both protocols). No key, or a
key that is none of the configured ones: 401 / UNAUTHENTICATED; a valid key that does not open
this group: 403 / PERMISSION_DENIED. Refusals are counted in
``cnnserve_access_denied_total{protocol,group,reason}``. A key is never logged, echoed or put in
a metric: messages name the group and the header, never the value.

Keys come from ``--access-keys-file`` and the ``CNNSERVE_ACCESS_KEYS`` environment variable (not
a settings field, so that it is never a command-line flag visible in ``ps``, nor copied into the
settings handed to front ends: they inherit the environment). Both hold whitespace-separated
entries ``KEY`` (every group) or ``GROUP[,GROUP...]:KEY``.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import orjson

from service.security.groups import GROUPS, grpc_group, http_group

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from service.metrics import Metrics

KEYS_ENV = "CNNSERVE_ACCESS_KEYS"
MIN_KEY_LENGTH = 16  # shorter keys are guessable; refused at start
KEY_HEADER = "x-api-key"
HOW_TO_SEND = "send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


class AccessConfigError(ValueError):
    """A key file or entry that cannot be used; the message never contains a key."""


@dataclass(frozen=True)
class Denial:
    authenticated: bool  # False: 401 / UNAUTHENTICATED; True: 403 / PERMISSION_DENIED
    reason: str  # metric label: missing_key, invalid_key, forbidden
    message: str


def parse_keys(text: str, source: str) -> list[tuple[bytes, frozenset[str]]]:
    """Entries of a key file or of the environment variable → (key, groups) pairs."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        for entry in line.split("#", 1)[0].split():
            where = f"{source}, line {n}"
            if ":" in entry:
                names, key = entry.split(":", 1)
                groups = frozenset(g.strip() for g in names.split(",") if g.strip())
                unknown = sorted(groups - set(GROUPS))
                if unknown or not groups:
                    raise AccessConfigError(
                        f"{where}: unknown access group(s) {', '.join(unknown) or '(none)'} before ':' "
                        f"(known: {', '.join(GROUPS)}); a key without groups may not contain ':'"
                    )
            else:
                key, groups = entry, frozenset(GROUPS)
            if len(key) < MIN_KEY_LENGTH:
                raise AccessConfigError(f"{where}: a key is shorter than {MIN_KEY_LENGTH} characters")
            keys.append((key.encode(), groups))
    return keys


def load_keys(keys_file: str, environ: Mapping[str, str] | None = None) -> list[tuple[bytes, frozenset[str]]]:
    env: Mapping[str, str] = os.environ if environ is None else environ
    keys = []
    if keys_file:
        try:
            text = Path(keys_file).read_text()
        except OSError as e:
            raise AccessConfigError(f"cannot read --access-keys-file {keys_file}: {e.strerror}") from None
        keys += parse_keys(text, keys_file)
    keys += parse_keys(env.get(KEYS_ENV, ""), KEYS_ENV)
    return keys


class AccessPolicy:
    def __init__(self, restricted: list[str], keys: list[tuple[bytes, frozenset[str]]]) -> None:
        self.restricted = frozenset(restricted)
        self.keys = keys
        if self.restricted and not keys:
            raise AccessConfigError(
                f"--restricted-apis {','.join(restricted)} needs at least one key: --access-keys-file or {KEYS_ENV}"
            )

    @classmethod
    def from_settings(cls, settings: AccessSettings) -> AccessPolicy:
        return cls(settings.restricted_apis, load_keys(settings.access_keys_file))

    def groups_of(self, presented: bytes) -> frozenset[str] | None:
        """The groups ``presented`` opens, or None. Every key is compared, each in constant time,
        so the time taken says nothing about which key (or how much of one) matched."""
        found: frozenset[str] | None = None
        for key, groups in self.keys:
            if hmac.compare_digest(key, presented):
                found = groups
        return found

    def check(self, group: str, authorization: bytes | None, api_key: bytes | None) -> Denial | None:
        if group not in self.restricted:
            return None
        presented = api_key
        if presented is None and authorization is not None:
            scheme, _, token = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                presented = token.strip()
        if not presented:
            return Denial(False, "missing_key", f"the {group} API needs a key: {HOW_TO_SEND}")
        groups = self.groups_of(presented)
        if groups is None:
            return Denial(False, "invalid_key", f"the key sent for the {group} API is not valid")
        if group not in groups:
            return Denial(True, "forbidden", f"the key sent does not give access to the {group} API")
        return None


class AccessSettings(Protocol):
    """The settings this module reads (service.settings.Settings imports this package's groups for
    its validator, so the class is described here rather than imported)."""

    restricted_apis: list[str]
    access_keys_file: str


class HttpAccess:
    """ASGI middleware: refuses requests to restricted groups before any route runs (nothing of
    the body is read). Installed only when some group is restricted."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy, metrics: Metrics) -> None:
        self.app = app
        self.policy = policy
        self.denied = metrics.access_denied

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        group = http_group(scope["path"])
        if group not in self.policy.restricted:
            await self.app(scope, receive, send)
            return
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
        denial = self.policy.check(group, authorization, api_key)
        if denial is None:
            await self.app(scope, receive, send)
            return
        self.denied.labels("http", group, denial.reason).inc()
        status = 403 if denial.authenticated else 401
        body = orjson.dumps({"error": denial.message})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if not denial.authenticated:
            headers.append((b"www-authenticate", b'Bearer realm="cnnserve"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _deny_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``code``; the request is
    not deserialized."""

    async def unary(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    async def streaming(request_or_iterator: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as streaming responses need

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class GrpcAccess(grpc.aio.ServerInterceptor):
    """Refuses calls to restricted groups before their handler runs. Installed only when some
    group is restricted (an interceptor costs every call a little)."""

    def __init__(self, policy: AccessPolicy, metrics: Metrics) -> None:
        self.policy = policy
        self.denied = metrics.access_denied

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        group = grpc_group(handler_call_details.method)
        if group not in self.policy.restricted:
            return await continuation(handler_call_details)
        authorization = api_key = None
        for name, value in handler_call_details.invocation_metadata or ():
            if name == "authorization":
                authorization = value.encode() if isinstance(value, str) else value
            elif name == KEY_HEADER:
                api_key = value.encode() if isinstance(value, str) else value
        denial = self.policy.check(group, authorization, api_key)
        handler = await continuation(handler_call_details)
        if denial is None or handler is None:
            return handler
        self.denied.labels("grpc", group, denial.reason).inc()
        code = grpc.StatusCode.PERMISSION_DENIED if denial.authenticated else grpc.StatusCode.UNAUTHENTICATED
        return _deny_handler(handler, code, denial.message)
