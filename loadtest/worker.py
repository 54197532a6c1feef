"""One client process's callers: the closed loop (N callers back to back) and the open loop
(Poisson arrivals counted from their scheduled time)."""

from __future__ import annotations

import asyncio
import math
import random
import resource

import numpy as np

from loadtest.clients import make_sender
from loadtest.config import LoadConfig, now
from loadtest.payloads import build_payloads


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Worker:
    """The callers (or the arrival process) of one client process."""

    def __init__(
        self,
        cfg: LoadConfig,
        index: int,
        concurrency: int,
        rate: float | None,
        requests: int | None,
        images: list[bytes],
        tensor: np.ndarray | None,
        counters,
    ) -> None:
        self.cfg, self.index = cfg, index
        self.concurrency, self.rate = concurrency, rate
        self.requests_mode = requests is not None
        self.tickets = requests or 0  # measured requests left to send (requests mode)
        self.images, self.tensor = images, tensor
        self.counters = counters  # [completed, errors, latency seconds sum], read by the progress thread
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.dropped = 0
        self.last_done = 0.0
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    async def setup(self) -> None:
        payloads = build_payloads(self.cfg, self.images, self.tensor, offset=self.index * 7919)
        self.sender = make_sender(self.cfg)
        await self.sender.setup()
        self.items = self.sender.prepare(payloads)

    def _record(self, start: float, done: float, code: str | None) -> None:
        c = self.counters
        if code is None:
            c[0] += 1
            c[2] += done - start
        else:
            c[1] += 1
        if (start >= self.t0) if self.requests_mode else (self.t0 <= done < self.t1):
            if code is None:
                self.latencies.append(done - start)
            else:
                self.errors[code] = self.errors.get(code, 0) + 1
            if done > self.last_done:
                self.last_done = done

    def _snap_start(self) -> None:
        self.cpu_start = cpu_seconds()

    def _snap_end(self) -> None:
        if self.cpu_end is None:
            self.cpu_end = cpu_seconds()

    async def _closed(self, slot: int) -> None:
        send, record, items = self.sender.send, self._record, self.items
        n = len(items)
        i = (slot * 31) % n
        t0, t1 = self.t0, self.t1
        while True:
            t = now()
            if t >= t1:
                return
            if self.requests_mode and t >= t0:
                if self.tickets <= 0:
                    return
                self.tickets -= 1
            code = await send(items[i], slot)
            record(t, now(), code)
            i += 1
            if i == n:
                i = 0

    async def _one(self, item, scheduled: float) -> None:
        try:
            code = await self.sender.send(item, None)
        except Exception as e:
            code = type(e).__name__
        self._record(scheduled, now(), code)

    async def _open(self) -> None:
        rng = random.Random(self.cfg.seed * 1000 + self.index)
        rate = self.rate or 0.0  # set whenever the open loop runs
        items, n, i = self.items, len(self.items), 0
        tasks: set[asyncio.Task] = set()
        t = self.start + rng.expovariate(rate)
        t0, t1 = self.t0, self.t1
        limit = self.cfg.max_outstanding
        create_task = asyncio.get_running_loop().create_task
        stop = False
        try:
            while not stop:
                current = now()
                while t <= current:
                    if t >= t1 or (self.requests_mode and t >= t0 and self.tickets <= 0):
                        stop = True
                        break
                    if self.requests_mode and t >= t0:
                        self.tickets -= 1
                    if len(tasks) >= limit:
                        if t >= t0:
                            self.dropped += 1
                    else:
                        task = create_task(self._one(items[i], t))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        i += 1
                        if i == n:
                            i = 0
                    t += rng.expovariate(rate)
                if not stop:
                    await asyncio.sleep(max(0.0, t - now()))
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in list(tasks):
                task.cancel()
            raise

    async def run(self, start: float) -> dict:
        cfg = self.cfg
        self.start = start
        self.t0 = start + cfg.warmup
        self.t1 = math.inf if self.requests_mode and cfg.duration is None else self.t0 + (cfg.duration or 10.0)
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, start - now()))
        loop.call_later(max(0.0, self.t0 - now()), self._snap_start)
        if not math.isinf(self.t1):
            loop.call_later(max(0.0, self.t1 - now()), self._snap_end)
        if self.rate is not None:
            jobs = [loop.create_task(self._open())]
        else:
            jobs = [loop.create_task(self._closed(slot)) for slot in range(self.concurrency)]
        if self.requests_mode:
            _, pending = await asyncio.wait(
                jobs, timeout=None if math.isinf(self.t1) else self.t1 - now() + min(cfg.timeout, 5.0)
            )
        else:
            # Answers after the window do not count: give stragglers a moment, then stop.
            _, pending = await asyncio.wait(jobs, timeout=self.t1 - now() + min(cfg.timeout, 5.0))
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.wait(pending)
        if self.cpu_start is None:
            self._snap_start()
        self._snap_end()
        cpu_s = (self.cpu_end or 0.0) - (self.cpu_start or 0.0)  # both set just above
        end = self.last_done if self.requests_mode else self.t1
        return {
            "index": self.index,
            "latencies": np.asarray(self.latencies, dtype=np.float64),
            "errors": self.errors,
            "dropped": self.dropped,
            "t0": self.t0,
            "end": end,
            "cpu_s": cpu_s,
            "cpu_window_s": (min(now(), self.t1) if self.requests_mode else self.t1) - self.t0,
        }

    async def close(self) -> None:
        await self.sender.close()
