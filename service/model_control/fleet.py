"""The front ends of one multi-process server (``--workers N --executor worker``) swap a model's
versions together in poll mode.

Each front end polls the repository and loads a change on its own (the sessions are its own), then,
before swapping, says in its file of the server's run folder what it prepared: the change's key (a
digest of the model folder as it read it) and the versions that loaded. It swaps only once every
front end has prepared, or already serves, the same key with the same versions; it gives up on
the change (closing what it loaded, keeping what served) if another front end loaded a different
set, or nobody agreed within ``timeout_s``, and the next poll tries again. A front end restarted by
the supervisor loads what the folder holds at start-up and says so, which is what the others
wait for. Files are replaced whole (write, then rename), so a reader never sees half of one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

POLL_S = 0.05  # how often a waiting front end reads the others' files


def change_key(disk_state: object) -> str:
    return hashlib.sha1(repr(disk_state).encode()).hexdigest()[:16]


class FleetBarrier:
    def __init__(self, run_dir: str, index: int, frontends: int, timeout_s: float) -> None:
        self.folder = Path(run_dir) / "model-control"
        self.folder.mkdir(exist_ok=True)
        self.index, self.frontends, self.timeout_s = index, frontends, timeout_s
        self.mine: dict[str, dict[str, list[Any]]] = {"prepared": {}, "serving": {}}
        self._write()

    def _path(self, index: int) -> Path:
        return self.folder / f"frontend-{index}.json"

    def _write(self) -> None:
        staging = self.folder / f".frontend-{self.index}.tmp"
        staging.write_text(json.dumps(self.mine))
        os.replace(staging, self._path(self.index))

    def _read(self, index: int) -> dict[str, Any]:
        try:
            doc = json.loads(self._path(index).read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def serving(self, model: str, key: str, versions: list[str]) -> None:
        """This front end now serves ``versions`` of ``model`` as of change ``key``."""
        self.mine["serving"][model] = [key, sorted(versions)]
        self.mine["prepared"].pop(model, None)
        self._write()

    def withdraw(self, model: str) -> None:
        self.mine["prepared"].pop(model, None)
        self._write()

    async def everyone_serves(self, model: str, key: str) -> bool:
        """After a change ``key`` of ``model`` that this front end swapped in: wait until every
        other front end serves it too (they agreed, so each swaps at its next look, within a
        poll). False after ``timeout_s``; at once True when this front end did not swap for it."""
        if self.mine["serving"].get(model, [None])[0] != key:
            return True
        deadline = time.monotonic() + self.timeout_s
        others = [k for k in range(self.frontends) if k != self.index]
        while any(self._read(k).get("serving", {}).get(model, [None])[0] != key for k in others):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def agree(self, model: str, key: str, versions: list[str]) -> str | None:
        """Wait until every front end prepared (or serves) ``versions`` of ``model`` for change
        ``key``: None then, else why the change is given up."""
        mine = [key, sorted(versions)]
        self.mine["prepared"][model] = mine
        self._write()
        deadline = time.monotonic() + self.timeout_s
        while True:
            waiting = []
            for k in range(self.frontends):
                if k == self.index:
                    continue
                doc = self._read(k)
                theirs = [doc.get(kind, {}).get(model) for kind in ("prepared", "serving")]
                if mine in theirs:
                    continue
                for entry in theirs:
                    if isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
                        self.withdraw(model)
                        return (f"front end {k} loaded versions {entry[1] or 'none'} of this change where front "
                                f"end {self.index} loaded {mine[1] or 'none'}; no front end swaps")  # fmt: skip
                waiting.append(k)
            if not waiting:
                return None
            if time.monotonic() > deadline:
                self.withdraw(model)
                return (f"front end(s) {', '.join(map(str, waiting))} did not load this change within "
                        f"{self.timeout_s:.0f}s; no front end swaps, the next poll tries again")  # fmt: skip
            await asyncio.sleep(POLL_S)
