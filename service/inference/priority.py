"""Which images may wait: a request's own images go first; background work (the perturbed images
of an explanation) has a lane of its own, computed by threads at a lower OS priority.

A parameter, not ambient state: the explainer submits its images with
``InferenceCore.run(..., priority=Priority.BACKGROUND)``, the core hands it to the model's queue
(``service.inference.serving.BatchQueue.submit``), and both queues honour it: the local
``Batcher`` keeps a second deque and batch thread, ``RemoteBatcher`` marks the records it sends
the device executor, which keeps a second queue and compute thread of its own.
"""

from __future__ import annotations

import logging
import os
import threading
from enum import IntEnum

log = logging.getLogger("cnnserve.priority")

#: How much lower the OS priority (nice) of threads computing background work is (Linux: per
#: thread). Against a nice-0 thread CFS gives a nice-10 one about a tenth of a contended core
#: (weights 110 vs 1024), and all of an idle one. A thread cannot lower its nice again without
#: CAP_SYS_NICE, hence threads of their own for background work.
BACKGROUND_NICE = 10


class Priority(IntEnum):
    REQUEST = 0  # a request's own images: /predict, Classify, v2 infer
    BACKGROUND = 1  # a lane of its own, computed at a lower OS priority: an explanation's perturbed images


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Raise the calling thread's nice by ``nice`` (Linux: per thread); where that is refused or
    not Linux, the thread keeps its priority and background work only has its own lane."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
    except (OSError, AttributeError) as e:  # pragma: no cover - not Linux, or a seccomp policy
        log.info("a background thread keeps its priority: %s", e)
