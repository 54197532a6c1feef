"""What the controller records and shares: version states, name rules, releasing memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
from dataclasses import dataclass

READY, LOADING, UNAVAILABLE = "READY", "LOADING", "UNAVAILABLE"
#: Model names are folder names; anything with a separator or a leading dot is not one of ours.
VALID_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
#: A retired version is closed once it has been idle (nothing queued, nothing being decoded) on
#: two looks this far apart: an explanation submits its images in several steps, and a request
#: that looked the version up before the swap may still be reading its body.
RETIRE_GRACE_S = 1.0


def release_memory() -> None:
    """Free a closed session now and hand the freed pages back to the OS: without malloc_trim,
    glibc keeps them in its arenas and the process's memory only plateaus (measured: 171 MiB at
    start, 320 MiB after 12 reloads of the 16 MB model)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)  # glibc only
        if trim is not None:
            trim(0)


@dataclass
class VersionStatus:
    state: str
    reason: str = ""


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
