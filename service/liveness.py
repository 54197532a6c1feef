"""What /healthz answers in a server of one process, which has no supervisor to notice a hang.

A hung event loop answers nothing, so the kubelet's liveness probe fails by itself. A hung batch
thread does not stop the loop: /healthz would say "live" while every request waits. So each local
batcher reports its batches in flight here (``service.inference.batcher.Batcher.on_batch``), and
/healthz answers 503 while one has been out longer than ``--hang-timeout-seconds``: after the
probe's failure threshold the kubelet restarts the container, as the multi-process supervisor
would restart the process. In a multi-process server nothing is watched here (the supervisor
judges every process from the shared table), so a front end's /healthz stays "the process answers".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("cnnserve.liveness")


class Liveness:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._in_flight: dict[tuple[str, int], tuple[float, int]] = {}  # (model, lane) → (since, images)
        self._said: str | None = None

    def watch(self, index: int, model: str) -> Callable[[int, int], None]:
        """``Batcher.on_batch`` for ``model`` (name/version); called on the event loop."""

        def on_batch(lane: int, images: int) -> None:
            if images:
                self._in_flight[(model, lane)] = (time.monotonic(), images)
            else:
                self._in_flight.pop((model, lane), None)

        return on_batch

    def reason(self) -> str | None:
        """None while live, else why not (a batch out past the timeout); logged once per hang."""
        now = time.monotonic()
        for (model, lane), (since, images) in self._in_flight.items():
            if now - since > self.timeout:
                thread = "background batch thread" if lane else "batch thread"
                why = (f"the {thread} for {model} has not come back for {now - since:.1f}s with a batch of "
                       f"{images} image(s) (--hang-timeout-seconds {self.timeout:g})")  # fmt: skip
                if self._said != f"{model}/{lane}/{since}":
                    self._said = f"{model}/{lane}/{since}"
                    log.error("not live: %s", why)
                return why
        return None
