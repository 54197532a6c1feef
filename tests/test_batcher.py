"""The batcher alone: no server, no ORT — a numpy batch function that records what it saw."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.errors import DeadlineExceeded, InferenceFailed, Overloaded
from service.inference.batcher import Batcher, BatchObserver


class Recorder(BatchObserver):
    def __init__(self):
        self.batches: list[int] = []
        self.drops: list[tuple[str, int]] = []

    def batch_done(self, size, requests, queue_waits_s, compute_s):
        self.batches.append(size)

    def dropped(self, reason, images):
        self.drops.append((reason, images))


def doubling(delay: float = 0.0, gate: threading.Event | None = None):
    seen: list[int] = []

    def run(parts):
        if gate is not None:
            gate.wait(5)
        if delay:
            time.sleep(delay)
        x = np.concatenate(parts)
        seen.append(len(x))
        return (x * 2, x + 1)

    return run, seen


def test_each_caller_gets_its_own_results_and_batches_form():
    async def main():
        gate = threading.Event()
        run, seen = doubling(gate=gate)
        rec = Recorder()
        b = Batcher(run, max_batch_size=8, observer=rec)
        b.start()
        first = asyncio.ensure_future(b.submit(np.array([[100.0]])))
        await asyncio.sleep(0.05)  # the first batch is now computing, held by the gate
        others = [asyncio.ensure_future(b.submit(np.array([[float(i)]]))) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, *others)
        await b.close()
        return results, seen, rec

    results, seen, rec = asyncio.run(main())
    assert results[0][0].tolist() == [[200.0]] and results[0][1].tolist() == [[101.0]]
    for i, (doubled, plus_one) in enumerate(results[1:]):
        assert doubled.tolist() == [[2.0 * i]] and plus_one.tolist() == [[i + 1.0]]
    # Greedy: the lone first request ran alone; the 20 queued meanwhile ran as 8 + 8 + 4.
    assert seen == [1, 8, 8, 4]
    assert rec.batches == seen


def test_large_request_is_split_across_batches_and_reassembled():
    async def main():
        run, seen = doubling()
        b = Batcher(run, max_batch_size=4)
        b.start()
        x = np.arange(10, dtype=np.float32).reshape(10, 1)
        doubled, _ = await b.submit(x)
        await b.close()
        return x, doubled, seen

    x, doubled, seen = asyncio.run(main())
    assert doubled.tolist() == (x * 2).tolist()
    assert seen == [4, 4, 2]


def test_full_queue_rejects_at_once():
    async def main():
        gate = threading.Event()
        run, _ = doubling(gate=gate)
        rec = Recorder()
        b = Batcher(run, max_batch_size=1, max_queue_size=3, observer=rec)
        b.start()
        running = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(np.zeros((3, 1))))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as info:
            await b.submit(np.zeros((1, 1)))
        gate.set()
        await asyncio.gather(running, queued)
        await b.close()
        return info.value, rec

    error, rec = asyncio.run(main())
    assert error.retry_after_s >= 1
    assert ("queue_full", 1) in rec.drops


def test_expired_and_cancelled_requests_are_not_computed():
    async def main():
        gate = threading.Event()
        run, seen = doubling(gate=gate)
        rec = Recorder()
        b = Batcher(run, max_batch_size=16, observer=rec)
        b.start()
        blocker = asyncio.ensure_future(b.submit(np.zeros((1, 1))))
        await asyncio.sleep(0.05)
        expired = asyncio.ensure_future(b.submit(np.zeros((2, 1)), deadline=time.monotonic() + 0.01))
        cancelled = asyncio.ensure_future(b.submit(np.zeros((3, 1))))
        alive = asyncio.ensure_future(b.submit(np.ones((4, 1))))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await expired
        doubled, _ = await alive
        await b.close()
        return seen, rec, doubled

    seen, rec, doubled = asyncio.run(main())
    assert seen == [1, 4]  # neither the 2 expired nor the 3 cancelled images reached the model
    assert ("deadline", 2) in rec.drops and ("cancelled", 3) in rec.drops
    assert doubled.tolist() == [[2.0]] * 4


def test_one_error_reaches_every_waiter_of_the_failed_batch_and_the_batcher_survives():
    calls = []

    def flaky(parts):
        calls.append(len(parts))
        if len(calls) == 2:
            raise RuntimeError("boom")
        return (np.concatenate(parts),)

    async def main():
        b = Batcher(flaky, max_batch_size=8)
        b.start()
        await b.submit(np.zeros((1, 1)))
        victims = [asyncio.ensure_future(b.submit(np.zeros((1, 1)))) for _ in range(3)]
        outcomes = await asyncio.gather(*victims, return_exceptions=True)
        after = await b.submit(np.full((1, 1), 7.0))
        await b.close()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert all(isinstance(o, InferenceFailed) for o in outcomes)
    assert len({id(o) for o in outcomes}) == 1  # one exception object for the whole batch
    assert calls == [1, 3, 1]
    assert after[0].tolist() == [[7.0]]


def test_queue_delay_waits_for_company_but_not_longer_than_the_delay():
    async def main():
        run, seen = doubling()
        b = Batcher(run, max_batch_size=4, max_queue_delay_s=0.2)
        b.start()
        t0 = time.monotonic()
        lone = await b.submit(np.zeros((1, 1)))
        lone_wait = time.monotonic() - t0
        four = await asyncio.gather(*(b.submit(np.zeros((1, 1))) for _ in range(4)))
        await b.close()
        return lone_wait, seen, lone, four

    lone_wait, seen, _, _ = asyncio.run(main())
    assert lone_wait >= 0.19  # held for company for the full delay...
    assert seen == [1, 4]  # ...while a full batch left at once


def test_background_work_has_its_own_lane_and_a_lower_os_priority():
    """Explanations' images (Priority.BACKGROUND, as the explainer submits them) run in a thread of
    their own at a lower OS priority: requests submitted while a background batch is stuck are
    answered, and background images never share a request's batch."""
    import os

    from service.inference.priority import BACKGROUND_NICE, Priority

    async def main():
        gate = threading.Event()
        batches: list[list[float]] = []
        nice: dict[str, int] = {}

        def run(parts):
            x = np.concatenate(parts)
            kind = "background" if x[0, 0] == 9.0 else "request"
            nice[kind] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            if kind == "background":
                gate.wait(5)  # stuck until every request below is answered
            batches.append(x[:, 0].tolist())
            return (x,)

        b = Batcher(run, max_batch_size=4)
        b.start()
        slow = asyncio.ensure_future(b.submit(np.full((6, 1), 9.0), None, Priority.BACKGROUND))
        await asyncio.sleep(0.05)  # the background batch is running, held by the gate
        fast = await asyncio.gather(*(b.submit(np.array([[float(i)]])) for i in (1, 2, 3)))
        gate.set()
        await slow
        await b.close()
        return batches, nice, fast

    batches, nice, fast = asyncio.run(main())
    assert [f[0].tolist() for f in fast] == [[[1.0]], [[2.0]], [[3.0]]]
    # The requests ran while the background batch was stuck; no batch mixed the two.
    assert sorted(v for b in batches[:-2] for v in b) == [1.0, 2.0, 3.0]
    assert batches[-2:] == [[9.0] * 4, [9.0] * 2]
    assert nice["background"] == min(19, nice["request"] + BACKGROUND_NICE)
