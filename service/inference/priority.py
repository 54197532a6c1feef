"""Which requests may wait: a request's own images go first; background work (the perturbed
images of an explanation) fills the room batches have left.

A context variable rather than a parameter, so the explainer's many submits through the core
carry it without every layer in between passing it on: ``InferenceCore.explain`` sets it for
its task, and the batchers read it when an image is queued.
"""

from __future__ import annotations

from contextvars import ContextVar

background: ContextVar[bool] = ContextVar("cnnserve_background", default=False)
