"""Explicit mode with several front ends: a load or unload request reaches one front end, but every
front end must apply it, in the same order as every other request.

The front end that takes the request appends it to one log file in the server's run folder
(under an exclusive lock, one JSON line each) and waits; every front end, that one included,
applies the log's operations in order, each swapped in only when all front ends agree
(``fleet.FleetBarrier``, keyed by the operation's number), and the waiting request is answered
with its own front end's outcome, the same everywhere by that agreement, once every front end
serves it (so that any request after the answer, to any front end, sees the change). A front
end started later (restarted by the supervisor) applies the whole log before it reports ready.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.model_control.controller import ModelController

log = logging.getLogger("cnnserve.model_control")
POLL_S = 0.05  # how often a front end looks for new operations


class OperationLog:
    def __init__(self, folder: Path, controller: ModelController) -> None:
        self.path = folder / "operations.jsonl"
        self.lock_path = folder / "operations.lock"
        self.controller = controller
        self.applied = 0  # operations of the log this front end has applied
        self.waiting: dict[str, asyncio.Future[None]] = {}  # operation id -> its request

    def _append(self, op: dict[str, Any]) -> None:
        with self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer at a time: whole lines, one order
            with self.path.open("a") as f:
                f.write(json.dumps(op) + "\n")

    def _read(self) -> list[dict[str, Any]]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        lines = text.split("\n")[:-1]  # a line still being written has no newline yet
        return [json.loads(line) for line in lines]

    async def submit(self, op: dict[str, Any]) -> None:
        """Append ``op`` and wait until this front end has applied it; its error, if any, raised."""
        op = {**op, "id": uuid.uuid4().hex}
        done = asyncio.get_running_loop().create_future()
        self.waiting[op["id"]] = done  # before the append: the follower may apply it at once
        try:
            await asyncio.to_thread(self._append, op)
            await done
        finally:
            self.waiting.pop(op["id"], None)

    async def catch_up(self) -> None:
        """Apply every operation not applied yet, in order."""
        ops = await asyncio.to_thread(self._read)
        for op in ops[self.applied :]:
            key = f"op-{self.applied}"  # what the front ends agree on (fleet.FleetBarrier)
            error: ServiceError | None = None
            try:
                await self.controller.apply(op, key)
            except ServiceError as e:
                error = e  # logged by the controller; the request that asked for it gets it
            self.applied += 1
            waiter = self.waiting.get(op.get("id", ""))
            barrier = self.controller.barrier
            if (
                waiter is not None
                and error is None
                and barrier is not None
                and not await barrier.everyone_serves(op["model"], key)
            ):
                log.warning("%s of %s: not every front end serves it yet; answering anyway", op["op"], op["model"])
            if waiter is not None and not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    async def follow(self) -> None:
        while True:
            try:
                await self.catch_up()
            except Exception:  # noqa: BLE001 - a bad entry must not stop the next ones
                log.exception("applying a model operation failed")
                self.applied += 1
            await asyncio.sleep(POLL_S)
