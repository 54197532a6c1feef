"""The supervisor's decisions, as plain functions of what it observed: is a process hung, when to
restart one that died, and when to give up and stop the server. No processes, no clock of its
own: ``service.workers.supervisor`` feeds it ``time.monotonic()`` and the shared table's rows, and
the unit tests feed it numbers.

Modelled on gunicorn's arbiter (a worker that stops touching its heartbeat for ``--timeout``
seconds is sent SIGABRT, then SIGKILL; a worker that fails at boot halts the arbiter) with a
backoff its arbiter lacks, so a process that crashes in a loop does not spin a core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from service.workers import shared_memory

#: Restart delays after quick deaths in a row: none for the first (a lone crash recovers at once),
#: then doubling from BACKOFF_BASE_S up to BACKOFF_MAX_S.
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 10.0
#: A process that lived this long before dying was healthy: its next death starts the count anew.
STABLE_AFTER_S = 30.0


def loop_names(executor: bool, models: list[str]) -> list[str]:
    """What each heartbeat slot of a process row is (``ControlTable.compute_slot``), for the log;
    ``models`` as name/version. A front end's batches are watched only with --executor worker."""
    if executor:
        return (
            ["I/O thread"]
            + [f"compute thread for {m}" for m in models]
            + [f"background compute thread for {m}" for m in models]
        )
    return (
        ["event loop"]
        + [f"batch thread for {m}" for m in models]
        + [f"background batch thread for {m}" for m in models]
    )


def hung(now: float, state: int, beats: np.ndarray, busy: np.ndarray, timeout: float,
         slot_names: list[str]) -> str | None:  # fmt: skip
    """Why a process counts as hung (one of its loops has not beaten for ``timeout`` seconds),
    or None. Only processes past their start-up are judged (a model may take minutes to load);
    a loop that never beat (0) is not judged either."""
    if state not in (shared_memory.LISTENING, shared_memory.READY):
        return None
    for slot, beat in enumerate(beats.tolist()):
        if beat <= 0 or now - beat <= timeout:
            continue
        name = slot_names[slot] if slot < len(slot_names) else f"loop {slot}"
        images = int(busy[slot])
        doing = f" running a batch of {images} image(s)" if images else ""
        return f"its {name} has not beaten for {now - beat:.1f}s{doing} (--hang-timeout-seconds {timeout:g})"
    return None


@dataclass
class Decision:
    """What to do about a process that died: restart it after ``delay`` seconds, or stop the server
    (``halt``: the cause, for the log and the exit)."""

    delay: float = 0.0
    halt: str | None = None


@dataclass
class _Row:
    quick_deaths: int = 0
    boot_failures: int = 0


@dataclass
class RestartPolicy:
    """Per process row: consecutive quick deaths (backoff) and consecutive deaths before ready
    (``max_boot_failures`` of them in a row stop the server, so Kubernetes restarts the pod and
    says CrashLoopBackOff instead of a pod that is alive and never ready)."""

    max_boot_failures: int = 5
    rows: dict[int, _Row] = field(default_factory=dict)

    def died(self, row: int, name: str, code: int | None, uptime: float, was_ready: bool,
             first_incarnation: bool) -> Decision:  # fmt: skip
        """``was_ready``: this incarnation reached READY; ``first_incarnation``: no incarnation of
        this row was ever ready (server start-up)."""
        r = self.rows.setdefault(row, _Row())
        if first_incarnation and not was_ready and code not in (-9, -15):
            # At start-up a failure is a configuration the user must fix (a model that cannot load):
            # its own log line says why; retrying would only repeat it.
            return Decision(halt=f"{name} failed at start-up (exit status {code})")
        r.boot_failures = 0 if was_ready else r.boot_failures + 1
        if r.boot_failures >= self.max_boot_failures:
            return Decision(halt=f"{name} failed at boot {r.boot_failures} times in a row (last exit status {code})")
        r.quick_deaths = 1 if uptime >= STABLE_AFTER_S else r.quick_deaths + 1
        return Decision(delay=backoff(r.quick_deaths))


def backoff(deaths: int) -> float:
    """Delay before restarting a process after ``deaths`` quick deaths in a row (1: at once)."""
    if deaths <= 1:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (deaths - 2))


def describe_exit(code: int | None, shm_free: int | None = None) -> str:
    """An exit status in words, with the likely cause where the signal says it."""
    if code is None:
        return "no exit status"
    if code == shared_memory.EXIT_NO_SHARED_MEMORY:
        return f"exit status {code}: no room in shared memory (/dev/shm); its log line says how much it needed"
    if code >= 0:
        return f"exit status {code}"
    import signal

    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    text = f"{name} (exit status {code})"
    if -code == signal.SIGBUS:
        free = f"{shm_free / 2**20:.0f} MiB free" if shm_free is not None else "free space unknown"
        text += f": shared memory ran out (/dev/shm: {free}); give the container a larger /dev/shm"
    return text
