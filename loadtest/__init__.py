"""``cnnserve loadtest``: a load generator for cnnserve (and any server speaking its protocols).

Modules, one job each: ``config`` (LoadConfig, defaults), ``arguments`` (the command's flags; light,
so ``cnnserve --help`` can list them without importing the rest), ``inputs`` (images and v2
tensors), ``payloads`` (request bodies), ``probe`` (one request before the run), ``clients`` (async
senders per target), ``worker`` (closed and open loops of one process), ``runner`` (the run, over
one or several processes), ``metrics`` (the server's /metrics over the window), ``machine``
(machine description, also for bench/), ``report`` (JSON, text, CSV) and ``command`` (the CLI).

The names below are imported lazily, so ``import loadtest`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoadConfig": "loadtest.config",
    "LoadTestError": "loadtest.config",
    "run": "loadtest.runner",
    "format_report": "loadtest.report",
    "write_json": "loadtest.report",
    "append_csv": "loadtest.report",
    "CSV_COLUMNS": "loadtest.report",
    "machine_info": "loadtest.machine",
    "spread": "loadtest.machine",
    "main": "loadtest.command",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loadtest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
