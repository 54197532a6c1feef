"""HTTP/2 attacks on the gRPC port (issue 17), each written with raw h2 frames (bench/h2attack.py)
over a plain socket, scaled down to seconds, against a real server. Each asserts a cheap refusal:
the attack's own outcome, the time it took, the attacked process's memory (/proc/PID/status) and
that legitimate Classify and /predict callers were answered during it.

The server is one process (``--workers 1``) whatever CNNSERVE_TEST_WORKERS says: the process
attacked is then the one whose memory is read. Bounds are generous (a shared 2-core machine):
they separate "refused cheaply" from the failures the issue measured (seconds of latency,
hundreds of MB kept), not one good run from another.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
import zlib

import grpc
import httpx
import pytest

from bench import h2attack
from service.grpc_api import calls_per_client, own_sockets, penalty_box, reset_budget
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, distinct_images, png_bytes, wait_until

MIB = 1024 * 1024
BODY_TIMEOUT = 2.0  # seconds a call may take to send its message (the server's --body-timeout-seconds)
MAX_CALLS = 400  # the server's --max-connections: gRPC calls in progress
RESETS = 200  # the server's --grpc-max-early-resets
PER_CLIENT = 150  # the server's --grpc-max-calls-per-client
STREAMS = 100  # the server's --grpc-max-concurrent-streams (so 3 x 300 silent streams fit the call slots)
PING_INTERVAL = 1.0  # the server's --grpc-min-ping-interval-seconds (10 s by default: a shorter test)
RSS_BOUND_MB = 150  # the bound on the attacked front end's growth
IMAGE = png_bytes(distinct_images(1)[0])
ATTACKER = "127.0.0.2"  # the rapid-reset attacker's address: a penalty on it spares callers from 127.0.0.1


@pytest.fixture(scope="module")
def target():
    s = ServerProcess(
        "--workers",
        "1",
        "--executor",
        "worker",
        "--drain-seconds",
        "0",
        "--body-timeout-seconds",
        str(BODY_TIMEOUT),
        "--max-request-bytes",
        str(MIB),
        "--max-connections",
        str(MAX_CALLS),
        "--grpc-max-early-resets",
        str(RESETS),
        "--grpc-max-calls-per-client",
        str(PER_CLIENT),
        "--grpc-penalty-seconds",
        "120",  # the attacker stays boxed for the whole test, however slow the machine
        "--grpc-max-concurrent-streams",
        str(STREAMS),
        "--grpc-min-ping-interval-seconds",
        str(PING_INTERVAL),
    )
    yield s
    assert s.stop() == 0, s.log


class Callers:
    """Legitimate callers while an attack runs: Classify over gRPC and /predict over HTTP in turn,
    one at a time, every 20 ms; latencies and failures are kept."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.server.grpc_target) as channel, httpx.Client(timeout=10) as http:
            stub = pb_grpc.ClassifierStub(channel)
            request = pb.ClassifyRequest(images=[pb.Image(encoded=IMAGE)], top_k=1)
            turn = 0
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    if turn % 2 == 0:
                        stub.Classify(request, timeout=10)
                    else:
                        r = http.post(
                            f"{self.server.http}/predict", content=IMAGE, headers={"Content-Type": "image/png"}
                        )
                        assert r.status_code == 200, r.text
                    self.latencies.append(time.perf_counter() - started)
                except (grpc.RpcError, AssertionError, httpx.HTTPError) as e:
                    self.failures.append(repr(e)[:200])
                turn += 1
                time.sleep(0.02)

    def __enter__(self) -> Callers:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)

    def check(self) -> None:
        assert not self.failures, self.failures[:3]
        # At least two answers, not a rate: the attacker runs in this test's own process and can hold
        # the GIL from the callers' thread (seen in a clean-clone run: 3 answers, each 7-14 ms).
        assert len(self.latencies) >= 2, "the legitimate callers were not answered during the attack"
        # Generous: the issue measured Classify going from 4 ms to 1.9 s under rapid reset.
        assert statistics.median(self.latencies) < 0.5, sorted(self.latencies)[-5:]
        assert max(self.latencies) < 5, sorted(self.latencies)[-5:]


def assert_memory_returns(server: ServerProcess, before: float) -> None:
    assert wait_until(lambda: server.memory()["VmRSS"] < before + RSS_BOUND_MB, timeout=30, interval=0.5), (
        f"RSS {server.memory()['VmRSS']:.0f} MB, {before:.0f} MB before the attack"
    )
    assert server.proc.poll() is None


def test_streams_per_connection_are_bounded_advertised_and_timed_out(target):
    """Headers only, never a message: past MAX_CONCURRENT_STREAMS streams are refused at once
    (REFUSED_STREAM), those admitted end with DEADLINE_EXCEEDED after the message timeout, and the
    call slots they held never starve a legitimate caller (the issue: 4 × 600 streams made every
    Classify fail with RESOURCE_EXHAUSTED until they closed)."""
    before = target.memory()["VmRSS"]
    outcomes: list[h2attack.Outcome] = []
    started = time.monotonic()
    with Callers(target) as callers:
        attackers = [
            threading.Thread(target=lambda: outcomes.append(h2attack.silent_streams(target.grpc_port, 300, 6)))
            for _ in range(3)
        ]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join(30)
    elapsed = time.monotonic() - started
    callers.check()
    assert len(outcomes) == 3
    for out in outcomes:
        assert out.max_concurrent_streams == STREAMS, out.as_dict()
        assert out.streams_opened == 300
        assert out.refused == 300 - STREAMS, out.as_dict()  # past the STREAMS the server admits
        assert out.statuses == {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]): STREAMS}, out.as_dict()
        assert "not received within" in out.messages[0]
    assert elapsed < 20
    assert_memory_returns(target, before)


def test_one_address_over_many_connections_cannot_hold_every_call_slot(target):
    """Five connections of 100 headers-only streams from one address (127.0.0.3): 500 calls, more
    than the server's 400 call slots (--max-connections). That address holds PER_CLIENT of them
    (ended DEADLINE_EXCEEDED by the message timeout); its other calls are refused
    RESOURCE_EXHAUSTED at once, and callers from elsewhere are served throughout (the issue: every
    legitimate Classify failed "Concurrent RPC limit exceeded!" until the streams closed)."""
    mark = len(target.lines)
    outcomes: list[h2attack.Outcome] = []
    with Callers(target) as callers:
        attackers = [
            threading.Thread(
                target=lambda: outcomes.append(h2attack.silent_streams(target.grpc_port, 100, 6, source="127.0.0.3"))
            )
            for _ in range(5)
        ]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join(30)
    callers.check()
    statuses: dict[str, int] = {}
    for out in outcomes:
        for code, n in out.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    held, refused = (str(c.value[0]) for c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert statuses == {held: PER_CLIENT, refused: 500 - PER_CLIENT}, [o.as_dict() for o in outcomes]
    assert any("calls in progress from your address" in m for o in outcomes for m in o.messages)
    assert not [line for line in target.lines[mark:] if "Traceback" in line]


def test_rapid_reset_puts_the_address_in_the_penalty_box_past_its_budget(target):
    """HEADERS + RST_STREAM(CANCEL) on new streams as fast as this client can, from 127.0.0.2: the
    connection is shut down once that address has cancelled more than --grpc-max-early-resets
    calls, and the address is boxed: its new connections are not accepted at all (the attacker
    that reconnects at once gets a connect timeout), while callers from 127.0.0.1 are answered
    throughout and memory stays flat (the issue: +0.5 GB kept, Classify 4 ms → 1.9 s; a
    reconnecting attacker before the box: p99 0.57 s). Logged once, counted in
    cnnserve_grpc_penalties_total."""
    before = target.memory()["VmRSS"]
    mark = len(target.lines)
    with Callers(target) as callers:
        out = h2attack.rapid_reset(target.grpc_port, seconds=10, source=ATTACKER)
        assert out.closed or out.goaway, out.as_dict()
        assert out.seconds < 8, out.as_dict()
        # grpc-core reads up to 32 new streams at a time and the budget is counted as their calls end.
        assert RESETS < out.streams_opened < 20 * RESETS, out.as_dict()
        again = h2attack.rapid_reset_reconnecting(target.grpc_port, seconds=3, source=ATTACKER)
    callers.check()
    assert again.connections == 0 and again.refused >= 1, again.as_dict()  # not one connection in 3 s
    with pytest.raises(OSError):  # the kernel drops the boxed address's SYNs: no connection
        socket.create_connection(("127.0.0.1", target.grpc_port), timeout=1, source_address=(ATTACKER, 0))
    socket.create_connection(("127.0.0.1", target.grpc_port), timeout=5).close()  # others: as usual
    boxed = [line for line in target.lines[mark:] if "penalty box" in line]
    assert len(boxed) == 1 and ATTACKER in boxed[0] and "socket filter" in boxed[0], boxed
    metrics = httpx.get(f"{target.http}/metrics").text
    assert "cnnserve_grpc_penalties_total 1.0" in metrics
    assert_memory_returns(target, before)


def test_the_hosts_own_loopback_address_is_never_boxed(target):
    """The Envoy sidecar and /readyz's self-check reach the gRPC port from 127.0.0.1: a rapid reset
    from there loses its connection past the budget, but the address is not boxed (that would take
    the whole pod off), so a new connection from it is served at once."""
    mark = len(target.lines)
    out = h2attack.rapid_reset(target.grpc_port, seconds=10)
    assert out.closed or out.goaway, out.as_dict()
    with grpc.insecure_channel(target.grpc_target) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=IMAGE)]), timeout=10
        )
    assert len(reply.results) == 1
    assert not [line for line in target.lines[mark:] if "penalty box" in line]


def test_keepalive_pings_on_an_idle_connection_are_accepted_and_a_ping_flood_is_not(target):
    """A client keeping an idle channel alive (PING every keepalive interval, no call) keeps its
    connection: grpc-core's own policy (one ping per 5 min, none without calls) sent it GOAWAY
    too_many_pings at its fourth ping. PINGs 50 times faster than allowed still get that GOAWAY."""
    keepalive = h2attack.pings(target.grpc_port, PING_INTERVAL * 1.2, 5, source="127.0.0.4")
    assert not keepalive.goaway and not keepalive.closed, keepalive.as_dict()
    flood = h2attack.pings(target.grpc_port, PING_INTERVAL / 50, 200, source="127.0.0.4")
    assert flood.goaway and flood.goaway_error == 11, flood.as_dict()  # ENHANCE_YOUR_CALM
    assert flood.goaway_data == "too_many_pings", flood.as_dict()


def test_a_declared_message_far_above_the_limit_is_ended_by_the_message_timeout(target):
    """A length prefix of 4 GiB, then data within flow control. grpc-core does not compare the
    prefix with grpc.max_receive_message_length before the data arrives (it raises the stream's
    window to the declared length): the message timeout ends the call, and what was buffered is
    freed. Scaled down: 48 MiB sent at most (the issue: 600 MiB kept)."""
    before = target.memory()["VmRSS"]
    with Callers(target) as callers:
        out = h2attack.large_prefix(target.grpc_port, declared=2**32 - 1, send=48 * MIB, seconds=BODY_TIMEOUT + 8)
    callers.check()
    assert out.statuses == {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]): 1} or out.resets, out.as_dict()
    assert out.seconds < BODY_TIMEOUT + 6, out.as_dict()
    assert_memory_returns(target, before)


def _deflate(data_size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 15)
    return z.compress(b"\0" * data_size) + z.flush()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_message_is_refused_before_it_inflates(target, encoding):
    """``grpc-encoding: gzip|deflate``, 64 KiB on the wire inflating to 64 MiB (the issue: 1 MB →
    1 GiB took 4.4 s and a 1.5 GB peak): UNIMPLEMENTED at once, nothing inflated."""
    payload = h2attack.gzip_bomb(64 * MIB) if encoding == "gzip" else _deflate(64 * MIB)
    assert len(payload) < MIB  # within --max-request-bytes on the wire
    before = target.memory()["VmRSS"]
    out = h2attack.compressed_message(target.grpc_port, payload, encoding=encoding, seconds=5)
    assert out.statuses == {str(grpc.StatusCode.UNIMPLEMENTED.value[0]): 1}, out.as_dict()
    assert "compressed requests are not accepted" in out.messages[0]
    assert out.seconds < 2, out.as_dict()
    assert target.memory()["VmRSS"] < before + 32  # not 64 MiB inflated
    # A well-formed call on a new channel is answered as usual.
    with grpc.insecure_channel(target.grpc_target) as channel:
        reply = pb_grpc.ClassifierStub(channel).Classify(
            pb.ClassifyRequest(images=[pb.Image(encoded=IMAGE)]), timeout=10
        )
    assert len(reply.results) == 1


def test_readiness_fails_while_the_grpc_port_cannot_serve(target):
    """Every gRPC call slot held by streams that never send a message: /readyz, which asks the gRPC
    port for its health over loopback, turns 503 while HTTP itself still answers, and 200 again
    once the message timeout has freed the slots."""
    assert httpx.get(f"{target.http}/readyz").status_code == 200
    holders = [
        threading.Thread(target=h2attack.silent_streams, args=(target.grpc_port, 100, BODY_TIMEOUT + 1))
        for _ in range(MAX_CALLS // 100)
    ]
    for t in holders:
        t.start()
    try:
        saw_503 = wait_until(lambda: httpx.get(f"{target.http}/readyz").status_code == 503, timeout=BODY_TIMEOUT)
        r = httpx.get(f"{target.http}/readyz")
    finally:
        for t in holders:
            t.join(30)
    assert saw_503
    assert httpx.get(f"{target.http}/healthz").status_code == 200
    assert wait_until(lambda: httpx.get(f"{target.http}/readyz").status_code == 200, timeout=15), r.text


def test_calls_per_client_counts_addresses_not_connections_and_never_loopback():
    calls = calls_per_client.CallsPerClient(2)
    held = [calls.admit(lambda p=p: f"ipv4:10.0.0.7:{p}") for p in (1000, 1001)]  # two connections
    assert held == ["10.0.0.7", "10.0.0.7"] and calls.admit(lambda: "ipv4:10.0.0.7:1002") is None
    assert calls.admit(lambda: "ipv4:10.0.0.8:1000") == "10.0.0.8"  # another client: its own count
    for loopback in ("ipv4:127.0.0.1:1", "ipv6:%5B::1%5D:1", "ipv6:%5B::ffff:127.0.0.1%5D:1", "unix:/x"):
        assert all(calls.admit(lambda peer=loopback: peer) == "" for _ in range(3))
    calls.release("10.0.0.7")
    assert calls.admit(lambda: "ipv4:10.0.0.7:1003") == "10.0.0.7"  # a slot freed is taken again


def test_the_reset_budget_finds_and_shuts_down_exactly_the_peers_socket():
    """reset_budget's socket lookup on real sockets of this process: grpc-core listens dual-stack,
    so an IPv4 client shows as ::ffff:a.b.c.d there; only the named connection is shut down."""
    assert reset_budget.parse_peer("ipv4:127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert reset_budget.parse_peer("ipv6:[::1]:443") == ("::1", 443)
    assert reset_budget.parse_peer("ipv6:%5B::1%5D:49018") == ("::1", 49018)  # as grpc-core writes it
    assert reset_budget.parse_peer("ipv6:%5B::ffff:127.0.0.1%5D:80") == ("127.0.0.1", 80)  # dual-stack
    assert reset_budget.parse_peer("unix:/tmp/x") is None
    assert reset_budget.parse_peer("ipv4:127.0.0.1:²") is None
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    accepted = [listener.accept()[0] for _ in clients]
    try:
        target = clients[0].getsockname()[:2]
        assert own_sockets.shutdown_connection(port, target)
        assert clients[0].recv(10) == b""  # the server side is shut down: end of stream
        clients[1].setblocking(False)
        with pytest.raises(BlockingIOError):
            clients[1].recv(10)  # the other connection is untouched
        assert not own_sockets.shutdown_connection(port, ("127.0.0.1", 1))
    finally:
        for s in (*clients, *accepted, listener):
            s.close()


def _connects(port: int, host: str, source: str) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5, source_address=(source, 0)).close()
        return True
    except OSError:
        return False


def test_the_penalty_box_filter_drops_exactly_the_boxed_addresses():
    """The penalty box's socket filter on a real dual-stack listener of this process: SYNs from a
    boxed IPv4 or IPv6 address are dropped (connect times out), other addresses connect, and the
    filter's removal lets everyone in again."""
    listener = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    port = listener.getsockname()[1]
    try:
        program = penalty_box.drop_filter(["127.0.0.2", "::1"])
        assert own_sockets.on_listeners(port, lambda s: penalty_box.attach_filter(s, program)) == 1
        assert not _connects(port, "127.0.0.1", "127.0.0.2")
        assert not _connects(port, "::1", "::1")
        assert _connects(port, "127.0.0.1", "127.0.0.1")
        assert _connects(port, "127.0.0.1", "127.0.0.3")
        assert own_sockets.on_listeners(port, penalty_box.detach_filter) == 1
        assert _connects(port, "127.0.0.1", "127.0.0.2")
    finally:
        listener.close()
