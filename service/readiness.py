"""Whether this server takes traffic: the one answer every readiness endpoint gives.

In a multi-process server a front end is handed the shared control table
(``service.workers.shared_memory.ControlTable``) as a :class:`ProcessGroup`: a drain turns every
front end's readiness false at once, and a front end is ready when it and at least one device
executor are, and no front end listens that cannot serve yet. A front end replaced while another
serves does not count: it joins the ports only once ready (``service.server``), so no probe or
request reaches it before. One that listens while loading (the first start, or every front end
restarting at once) does: the kernel hands it connections it would answer "loading", so a 200
from any front end means every front end answers (README "Supervision").
"""

from __future__ import annotations

from typing import Protocol

from service.metrics import Metrics


class ProcessGroup(Protocol):
    """The state every process of a multi-process server shares."""

    @property
    def draining(self) -> bool: ...
    def executors_ready(self) -> bool: ...
    def frontends_loading(self) -> bool: ...


class Readiness:
    def __init__(self, metrics: Metrics, group: ProcessGroup | None = None) -> None:
        self._metrics = metrics
        self._group = group
        self._loaded = False
        self._draining = False

    def models_loaded(self, *, report: bool = True) -> None:
        """The models are served; ``report``: say so in the ready gauge now (a front end of a
        multi-process server leaves the gauge to the whole server's state)."""
        self._loaded = True
        if report:
            self._metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Readiness turns false; admitted and new requests are still served until the server stops."""
        self._draining = True
        self._metrics.ready.set(0)

    def reason(self) -> str | None:
        """None when ready for traffic, else why not: "draining", "loading models", "no device
        executor is ready (starting or restarting)" or that another front end is still loading."""
        group = self._group
        if self._draining or (group is not None and group.draining):
            return "draining"
        if not self._loaded:
            return "loading models"
        if group is not None and not group.executors_ready():
            return "no device executor is ready (starting or restarting)"
        if group is not None and group.frontends_loading():
            return "a front end still loading models takes connections"
        return None

    @property
    def is_ready(self) -> bool:
        return self.reason() is None
