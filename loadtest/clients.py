"""Senders, one per target family: async, pre-built bodies, as little work per request as possible."""

from __future__ import annotations

import asyncio

from loadtest.config import LoadConfig, LoadTestError
from loadtest.payloads import CLASSIFY_METHOD, MODEL_INFER_METHOD, Payload, raw_http_request


class GrpcSender:
    """grpc.aio with pass-through (de)serialisers: bodies are pre-serialised, answers are not parsed."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.method = CLASSIFY_METHOD if cfg.target == "grpc" else MODEL_INFER_METHOD
        self.channels: list = []
        self.calls: list = []
        self._rr = 0

    async def setup(self) -> None:
        import grpc

        self._rpc_error = grpc.aio.AioRpcError
        options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.use_local_subchannel_pool", 1),
        ]  # one TCP connection per channel
        security = self.cfg.security()
        self.metadata = security.grpc_metadata() or None
        for _ in range(self.cfg.grpc_channels):
            channel = security.grpc_aio_channel(self.cfg.resolved_address(), options=options)
            await asyncio.wait_for(channel.channel_ready(), 10)
            self.channels.append(channel)
            self.calls.append(channel.unary_unary(self.method))

    def prepare(self, payloads: list[Payload]) -> list[bytes]:
        return [p.body for p in payloads]

    async def send(self, body: bytes, slot: int | None) -> str | None:
        calls = self.calls
        if slot is None:
            self._rr += 1
            slot = self._rr
        try:
            await calls[slot % len(calls)](body, timeout=self.cfg.timeout, metadata=self.metadata)
            return None
        except self._rpc_error as e:
            return e.code().name

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection, one request at a time; responses parsed by httptools."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        import httptools

        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self._parser_error = httptools.HttpParserError
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.waiter: asyncio.Future | None = None
        self.lost = False
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self._parser_error as e:
            self._fail(ConnectionError(f"bad HTTP response: {e}"))
            self.transport.close()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self.parser.get_status_code())

    def connection_lost(self, exc) -> None:
        self.lost = True
        self._fail(ConnectionError("connection closed"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _timed_out(self) -> None:
        self._fail(TimeoutError())
        self.lost = True
        self.transport.close()

    async def request(self, data: bytes, timeout: float) -> int:
        self.waiter = waiter = self.loop.create_future()
        self.transport.write(data)
        timer = self.loop.call_later(timeout, self._timed_out)
        try:
            return await waiter
        finally:
            timer.cancel()


class RawHttpSender:
    """Pre-rendered HTTP/1.1 requests over asyncio transports: one write per request, httptools
    parses the answer's status. A closed-loop caller keeps its own connection; the open loop
    takes an idle one from a pool or opens another."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        host, _, port = cfg.resolved_address().rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.conns: dict[int, _HttpConnection] = {}
        self.idle: list[_HttpConnection] = []
        self.all: list[_HttpConnection] = []

    async def setup(self) -> None:
        self.loop = asyncio.get_running_loop()
        security = self.cfg.security()
        self.ssl = security.ssl_context()
        self.headers = security.headers()
        (await self._connect()).transport.close()  # fail early if nobody listens

    def prepare(self, payloads: list[Payload]) -> list[bytes]:
        return [raw_http_request(p, self.cfg.resolved_address(), self.headers) for p in payloads]

    async def _connect(self) -> _HttpConnection:
        _, conn = await self.loop.create_connection(
            lambda: _HttpConnection(self.loop), self.host, self.port, ssl=self.ssl
        )
        self.all.append(conn)
        return conn

    async def send(self, data: bytes, slot: int | None) -> str | None:
        conn = self.conns.get(slot) if slot is not None else None
        if conn is None or conn.lost or not conn.keep_alive:
            if slot is None:
                while self.idle:
                    conn = self.idle.pop()
                    if not conn.lost and conn.keep_alive:
                        break
                else:
                    conn = None
            else:
                conn = None
            if conn is None:
                try:
                    conn = await self._connect()
                except OSError as e:
                    await asyncio.sleep(0.01)  # a refused connect must not spin
                    return f"connect:{type(e).__name__}"
                if slot is not None:
                    self.conns[slot] = conn
        try:
            status = await conn.request(data, self.cfg.timeout)
        except TimeoutError:
            return "timeout"
        except ConnectionError:
            return "connection_lost"
        if slot is None:
            self.idle.append(conn)
        return None if status == 200 else str(status)

    async def close(self) -> None:
        for conn in self.all:
            if conn.transport is not None and not conn.lost:
                conn.transport.close()
        await asyncio.sleep(0)


class AiohttpSender:
    """aiohttp.ClientSession, for a cross-check of the raw client's figures (more CPU per request).
    aiohttp comes with the ``loadtest`` extra."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg
        self.base = f"{cfg.scheme}://{cfg.resolved_address()}"

    async def setup(self) -> None:
        try:
            import aiohttp
        except ImportError:
            raise LoadTestError("--http-client aiohttp needs aiohttp: pip install 'cnnserve[loadtest]'") from None

        self._errors = (aiohttp.ClientError, asyncio.TimeoutError, OSError)
        security = self.cfg.security()
        self.headers = security.headers()
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False, ssl=security.ssl_context() or False),
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            skip_auto_headers=("User-Agent",),
        )

    def prepare(self, payloads: list[Payload]) -> list[tuple]:
        out = []
        for p in payloads:
            headers = {**p.extra_headers, **self.headers}
            if p.content_type:
                headers["Content-Type"] = p.content_type
            out.append((self.base + p.path, p.body, headers))
        return out

    async def send(self, item: tuple, slot: int | None) -> str | None:
        url, body, headers = item
        try:
            async with self.session.post(url, data=body, headers=headers) as r:
                await r.read()
                return None if r.status == 200 else str(r.status)
        except self._errors as e:
            return "timeout" if isinstance(e, asyncio.TimeoutError) else type(e).__name__

    async def close(self) -> None:
        await self.session.close()


def make_sender(cfg: LoadConfig):
    if cfg.target.startswith("grpc"):
        return GrpcSender(cfg)
    return AiohttpSender(cfg) if cfg.http_client == "aiohttp" else RawHttpSender(cfg)
