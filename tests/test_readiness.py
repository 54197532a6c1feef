"""Readiness, the one answer every readiness endpoint gives, over a real shared control table
(the multi-process server's ProcessGroup); and the request-byte budget both transports share.
No server process: the server-level behaviour is in tests/test_server.py and tests/test_workers.py."""

from __future__ import annotations

import pytest

from service.buffers import BufferedBytes
from service.errors import BufferFull
from service.metrics import Metrics, ModelStats
from service.readiness import Readiness
from service.workers import shared_memory


def _gauge(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("cnnserve_ready") or 0.0


def test_one_process_loading_ready_draining():
    metrics = Metrics()
    readiness = Readiness(metrics)
    assert readiness.reason() == "loading models" and not readiness.is_ready
    readiness.models_loaded()
    assert readiness.reason() is None and readiness.is_ready and _gauge(metrics) == 1
    readiness.begin_drain()
    assert readiness.reason() == "draining" and _gauge(metrics) == 0


def test_a_front_end_is_ready_with_one_executor_and_drains_with_the_server(tmp_path):
    shape = shared_memory.TableShape(str(tmp_path / "control"), 1, 2, 1, ModelStats.width(8))
    table = shared_memory.ControlTable(shape, create=True)
    metrics = Metrics()
    readiness = Readiness(metrics, table)
    readiness.models_loaded(report=False)
    assert _gauge(metrics) == 0  # the whole server's state sets a front end's gauge, not its own models
    table.state[:] = shared_memory.READY
    table.state[shape.frontend_row(1)] = shared_memory.STARTING  # the other front end restarts:
    assert readiness.is_ready  # it answers nothing meanwhile, this one serves (README "Supervision")
    assert table.frontend_serving(besides=shape.frontend_row(1))  # so it joins the ports once ready
    table.state[shape.frontend_row(1)] = shared_memory.LISTENING  # ... unless it listens while loading
    assert readiness.reason() == "a front end still loading models takes connections"
    table.state[shape.frontend_row(0)] = shared_memory.STOPPED  # e.g. every front end restarting at once
    assert not table.frontend_serving(besides=shape.frontend_row(1))
    table.state[0] = shared_memory.STARTING  # the only device executor restarts
    assert readiness.reason() == "no device executor is ready (starting or restarting)"
    table.state[:] = shared_memory.READY
    assert readiness.is_ready
    table.flags[0] = 1  # the supervisor drains: every front end turns unready at once
    assert readiness.reason() == "draining"


def test_buffered_bytes_refuse_past_the_limit_and_come_back():
    buffers = BufferedBytes(100)
    buffers.hold(60)
    with pytest.raises(BufferFull, match="60 request bytes already buffered"):
        buffers.hold(41)
    assert buffers.held == 60  # a refused hold takes nothing
    buffers.hold(40)
    buffers.release(60)
    buffers.hold(60)
    assert buffers.held == 100
