"""Which images may wait: a request's own images go first; background work (the perturbed images
of an explanation) fills the room batches have left.

A parameter, not ambient state: the explainer submits its images with
``InferenceCore.run(..., priority=Priority.BACKGROUND)``, the core hands it to the model's queue
(``service.inference.serving.BatchQueue.submit``), and both queues honour it: the local
``Batcher`` keeps a second deque, ``RemoteBatcher`` marks the records it sends the device
executor, which keeps a second queue of its own.
"""

from __future__ import annotations

from enum import IntEnum


class Priority(IntEnum):
    REQUEST = 0  # a request's own images: /predict, Classify, v2 infer
    BACKGROUND = 1  # batched only in the room requests leave: an explanation's perturbed images
