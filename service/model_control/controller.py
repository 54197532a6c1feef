"""The model controller of a one-process server: loads, reloads and unloads model versions while
requests are being served, and keeps the state and reason of each for the repository index.

A new or changed version is loaded and warmed up in a thread (``service.inference.runtime.load_model``,
the same path as at start-up, with every check it makes) while the old one keeps serving; only a
version that loaded is swapped in (``InferenceCore.swap_versions``, one step on the event loop).
A version that fails leaves what served before serving, and the index says why. Versions taken
out of service finish the requests they hold, then their batcher is closed and their session
dropped. One load, unload or poll runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from service.errors import ModelNotFound
from service.explain.layers import LayerModel, LayerModels
from service.inference.core import InferenceCore
from service.inference.repository import ModelSpec
from service.inference.runtime import load_model
from service.inference.serving import LoadedModel, ServedModel
from service.metrics import Metrics, model_info_labels
from service.model_control.disk import Fingerprint, fingerprint, model_names, versions_on_disk
from service.model_control.errors import ModelLoadFailed
from service.model_control.fleet import FleetBarrier, change_key
from service.model_control.operations import OperationLog
from service.model_control.policy import CONFIG_FILENAME, PolicyError, VersionPolicy, read_policy
from service.model_control.state import (
    LOADING,
    READY,
    RETIRE_GRACE_S,
    UNAVAILABLE,
    VALID_NAME,
    VersionStatus,
    one_line,
    release_memory,
)
from service.settings import Settings

log = logging.getLogger("cnnserve.model_control")

#: Opens a version to be served: (its spec, a key of its files) -> the version behind its queue,
#: loaded, warmed up and checked, not served until swapped in. By default a session in this
#: process (``ModelController.open_locally``); a front end of a server with a device executor has
#: the executor load it (``service.server``).
VersionOpener = Callable[[ModelSpec, str], Awaitable[LoadedModel]]


class ModelController:
    def __init__(
        self,
        core: InferenceCore,
        layer_models: LayerModels,
        metrics: Metrics,
        settings: Settings,
        barrier: FleetBarrier | None = None,
    ) -> None:
        self.core, self.layer_models, self.metrics, self.settings = core, layer_models, metrics, settings
        #: Several front ends (fleet.py): a change is swapped in only when every one has it loaded.
        self.barrier = barrier
        #: Several front ends in explicit mode: load and unload go through a shared log (operations.py).
        self.operations: OperationLog | None = None
        if barrier is not None and settings.model_control_mode == "explicit":
            self.operations = OperationLog(barrier.folder, self)
        self._serving = False  # start-up loads need no agreement: nothing serves yet
        self.root = Path(settings.model_repository).absolute()
        self.mode = settings.model_control_mode
        self.status: dict[str, dict[str, VersionStatus]] = {}
        #: Why a model as a whole could not be (re)loaded (config.json malformed, no version).
        self.model_reason: dict[str, str] = {}
        self.policies: dict[str, VersionPolicy] = {}
        self._loaded_from: dict[tuple[str, str], Fingerprint] = {}  # the files a served version came from
        self._seen: dict[str, object] = {}  # poll mode: each model's folder as last acted upon
        self._lock = asyncio.Lock()
        self._retiring: dict[asyncio.Task[None], LoadedModel] = {}
        self._poller: asyncio.Task[None] | None = None
        self.open_version: VersionOpener = self.open_locally

    # ---- start and stop ---------------------------------------------------------------------
    async def start(self) -> None:
        """Load what the mode says at start-up: poll, every model; explicit, the --load-model ones
        ("*": every model). A model that fails to load is reported in the index and the server
        starts without it; a --load-model name with no folder stops the server (a typo)."""
        if self.mode == "poll":
            names = model_names(self.root)
        else:
            wanted = self.settings.load_model
            names = model_names(self.root) if wanted == ["*"] else wanted
            unknown = [n for n in names if not self._folder(n).is_dir()]
            if unknown:
                raise FileNotFoundError(f"--load-model {', '.join(unknown)}: no such model folder in {self.root}")
        async with self._lock:  # a load request may arrive while start-up still loads
            for name in names:
                self._seen[name] = self._disk_state(name)
                try:
                    await self._load(name)
                except ModelLoadFailed:
                    pass  # logged and in the index; the other models still start
                if self.barrier is not None:
                    self.barrier.serving(name, change_key(self._seen[name]), list(self.core.versions(name)))
        if self.operations is not None:
            await self.operations.catch_up()  # a restarted front end: what the others did meanwhile

    def start_polling(self) -> None:
        self._serving = True
        if self.operations is not None:
            self._poller = asyncio.create_task(self.operations.follow(), name="model-operations")
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def close(self) -> None:
        """At shutdown, after the served models drained: stop polling, close retiring versions now."""
        if self._poller is not None:
            self._poller.cancel()
        for task, m in list(self._retiring.items()):
            task.cancel()
            await m.batcher.close()

    # ---- load -------------------------------------------------------------------------------
    def _folder(self, name: str) -> Path:
        return self.root / name

    async def load(self, name: str) -> None:
        """(Re)load model ``name`` as its folder and version policy say; ModelNotFound without a
        folder, ModelLoadFailed (naming each cause) when some of it could not be served."""
        if not VALID_NAME.match(name) or not self._folder(name).is_dir():
            raise ModelNotFound(f"no model {name!r} in the repository {self.root}")
        if self.operations is not None:  # several front ends: every one applies it, in one order
            await self.operations.submit({"op": "load", "model": name})
            return
        async with self._lock:
            await self._load(name)

    async def apply(self, op: dict[str, Any], key: str) -> None:
        """One operation of the shared log (operations.py), as every front end applies it."""
        async with self._lock:
            if op["op"] == "load":
                await self._load(op["model"], key)
            else:
                await self._unload(op["model"], op.get("version"), key)

    async def _load(self, name: str, key: str | None = None) -> None:
        """``key``: what the front ends agree on (fleet.py): the folder's digest in poll mode, the
        operation's number in explicit mode."""
        folder = self._folder(name)
        key = key or change_key(self._disk_state(name))
        try:
            policy = read_policy(folder)
        except PolicyError as e:
            self._model_failed(name, str(e))
            raise ModelLoadFailed(f"failed to load {name!r}: {e}") from None
        on_disk = versions_on_disk(folder)
        wanted = policy.choose(list(on_disk))
        problems: list[str] = []  # of the model as a whole: in the index under its name
        failed: list[str] = []  # of single versions: in the index under each version
        if missing := policy.missing(list(on_disk)):
            problems.append(f"version {', '.join(map(str, missing))} of its version policy is not in {folder}")
        if not on_disk:
            problems.append(f"{folder} holds no <version>/model.onnx")
        current = self.core.versions(name)
        new: dict[str, LoadedModel] = {}
        fresh: list[tuple[LoadedModel, Fingerprint]] = []
        for number in wanted:
            version, disk = str(number), on_disk[number]
            old = current.get(version)
            if old is not None and self._loaded_from.get((name, version)) == disk.fingerprint:
                new[version] = old  # unchanged: keep serving it as it is
                continue
            self._set(name, version, LOADING)
            try:
                loaded = await self._load_version(disk.spec, change_key(disk.fingerprint))
            except Exception as e:  # noqa: BLE001 - any failure of one version is reported, not raised
                reason = one_line(e)
                failed.append(f"version {version}: {reason}")
                self.metrics.model_loads.labels(name, "failed").inc()
                kept = " (the version loaded earlier keeps serving)" if old is not None else ""
                self._set(name, version, UNAVAILABLE, reason + kept)
                log.error("model %s version %s failed to load: %s%s", name, version, reason, kept)
                if old is not None:
                    new[version] = old
                continue
            new[version] = loaded
            fresh.append((loaded, disk.fingerprint))
        if problems or failed:
            # As Triton: a failed reload leaves the model as it was, less versions gone from disk.
            for version, old in current.items():
                if int(version) in on_disk:
                    new.setdefault(version, old)
        if self.barrier is not None and self._serving:
            why = await self.barrier.agree(name, key, list(new))
            if why is not None:
                await self._discard(name, fresh, current, why)
                error = ModelLoadFailed(f"failed to load {name!r}: {why}")
                error.retry = True  # type: ignore[attr-defined]  # poll_once tries the change again
                raise error
        removed = self.core.swap_versions(name, new)
        if self.barrier is not None:
            self.barrier.serving(name, key, list(new))
        if fresh or removed:
            together = " (every front end has it)" if self.barrier is not None and self._serving else ""
            log.info("model %s serves versions %s%s", name, ", ".join(sorted(new, key=int)) or "none", together)
        self.policies[name] = policy
        for loaded, fp in fresh:
            self._loaded_from[(name, loaded.version)] = fp
            self._set(name, loaded.version, READY)
        self._retire(removed, "not in the repository or its version policy any more")
        self._publish(name)
        if problems:
            self.model_reason[name] = "; ".join(problems)
        else:
            self.model_reason.pop(name, None)
        if problems or failed:
            raise ModelLoadFailed(f"failed to load {name!r}: {'; '.join(problems + failed)}")

    async def open_locally(self, spec: ModelSpec, key: str) -> LoadedModel:
        """A session in this process, behind a local batcher."""
        return self.core.local_model(await asyncio.to_thread(load_model, spec, self.settings))

    async def _load_version(self, spec: ModelSpec, key: str) -> LoadedModel:
        started = time.monotonic()
        # Its layers (for /explain) are read while the version loads (here, or in a device executor).
        companion = asyncio.ensure_future(asyncio.to_thread(_read_layers, spec))
        try:
            loaded = await self.open_version(spec, key)
        finally:
            layers = await companion
        if layers is not None:
            self.layer_models.add(spec.name, spec.version, layers)
        runtime = loaded.runtime
        self.metrics.model_loads.labels(spec.name, "loaded").inc()
        log.info("loaded %s/%s from %s (%s) on %s in %.2fs", spec.name, spec.version, runtime.path,
                 runtime.precision, runtime.provider, time.monotonic() - started)  # fmt: skip
        return loaded

    async def _discard(
        self, name: str, fresh: list[tuple[LoadedModel, Fingerprint]], current: dict[str, LoadedModel], why: str
    ) -> None:
        """Close versions loaded for a change the front ends did not agree on; what served still does."""
        log.error("model %s: %s", name, why)
        for loaded, _ in fresh:
            await loaded.batcher.close()
            rt = loaded.runtime
            earlier = current.get(loaded.version)
            if earlier is not None:
                self._set(name, loaded.version, READY)  # the earlier session keeps serving
            else:
                self._set(name, loaded.version, UNAVAILABLE, f"not swapped in: {why}")
                self.layer_models.remove(name, loaded.version)
            self._forget_info(rt, earlier.runtime if earlier is not None else None)

    def _forget_info(self, runtime: ServedModel, successor: ServedModel | None = None) -> None:
        """A session no longer served leaves cnnserve_model_info, unless ``successor`` (the session
        that serves its version now) has the same labels: its series is the successor's then.
        Zero first: with several processes the series lives in a shared file that remove() leaves."""
        labels = model_info_labels(runtime)
        if successor is not None and model_info_labels(successor) == labels:
            return
        self.metrics.model_info.labels(*labels).set(0)
        self.metrics.model_info.remove(*labels)

    def _model_failed(self, name: str, reason: str) -> None:
        self.model_reason[name] = reason
        self.metrics.model_loads.labels(name, "failed").inc()
        log.error("model %s failed to load: %s", name, reason)

    # ---- unload -----------------------------------------------------------------------------
    async def unload(self, name: str, version: str | None = None) -> None:
        """Stop serving model ``name`` (or one version of it); requests it holds still finish.
        ModelNotFound when there is no such model (or version) to unload. Unloading a model that
        is in the repository but not loaded succeeds, as in Triton."""
        if not VALID_NAME.match(name):
            raise ModelNotFound(f"no model {name!r} to unload")
        if self.operations is not None:
            self._unload_target(name, version)  # refused here, before the other front ends see it
            await self.operations.submit({"op": "unload", "model": name, "version": version})
            return
        async with self._lock:
            await self._unload(name, version)

    def _unload_target(self, name: str, version: str | None) -> dict[str, LoadedModel]:
        """The versions left after the unload; ModelNotFound when there is nothing to unload."""
        current = self.core.versions(name)
        if version:
            if version not in current:
                raise ModelNotFound(f"model {name!r} has no loaded version {version!r}")
            return {v: m for v, m in current.items() if v != version}
        if not current and name not in self.status and not self._folder(name).is_dir():
            raise ModelNotFound(f"no model {name!r} to unload")
        return {}

    async def _unload(self, name: str, version: str | None, key: str | None = None) -> None:
        keep = self._unload_target(name, version)
        if self.barrier is not None and self._serving and key is not None:
            why = await self.barrier.agree(name, key, list(keep))
            if why is not None:
                raise ModelLoadFailed(f"failed to unload {name!r}: {why}")
        self._retire(self.core.swap_versions(name, keep), "unloaded")
        if self.barrier is not None and key is not None:
            self.barrier.serving(name, key, list(keep))
        self._publish(name)

    def _retire(self, models: list[LoadedModel], why: str) -> None:
        for m in models:
            served = m.version in self.core.versions(m.name)  # reloaded in place: the new one serves
            if not served and self.status.get(m.name, {}).get(m.version, VersionStatus(READY)).state != UNAVAILABLE:
                self._set(m.name, m.version, UNAVAILABLE, why)
            self.metrics.model_unloads.labels(m.name).inc()
            log.info("model %s version %s out of service (%s); it finishes the requests it holds", m.name,
                     m.version, why)  # fmt: skip
            task = asyncio.create_task(self._close_when_idle(m), name=f"retire-{m.name}-{m.version}")
            self._retiring[task] = m
            task.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def _close_when_idle(self, m: LoadedModel) -> None:
        limit = time.monotonic() + max(self.settings.shutdown_timeout_seconds, RETIRE_GRACE_S)
        idle_looks = 0
        while idle_looks < 2 and time.monotonic() < limit:
            # Its own requests: a device executor's queue depth counts every version's.
            drained = await m.batcher.drain(max(0.0, limit - time.monotonic()))
            idle_looks = idle_looks + 1 if drained and m.decoding == 0 else 0
            if idle_looks < 2:
                await asyncio.sleep(RETIRE_GRACE_S)
        await m.batcher.close()
        rt = m.runtime
        successor = self.core.versions(m.name).get(m.version)
        if successor is None:  # not reloaded in place meanwhile
            self.layer_models.remove(m.name, m.version)
        self._forget_info(rt, successor.runtime if successor is not None else None)
        name, version = m.name, m.version
        # Drop the last references (this task's and the shutdown list's) before freeing.
        task = asyncio.current_task()
        if task is not None:
            self._retiring.pop(task, None)
        del m, rt
        await asyncio.to_thread(release_memory)
        log.info("model %s version %s closed; its session is released", name, version)

    # ---- state --------------------------------------------------------------------------------
    def _set(self, name: str, version: str, state: str, reason: str = "") -> None:
        self.status.setdefault(name, {})[version] = VersionStatus(state, reason)

    def _publish(self, name: str) -> None:
        versions = self.core.versions(name)
        self.metrics.model_version.labels(name).set(max(map(int, versions)) if versions else 0)

    def policy(self, name: str) -> VersionPolicy:
        return self.policies.get(name, VersionPolicy())

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every version with its state and reason, and every model
        folder never loaded (name only, as Triton lists them)."""
        out = []
        for name in sorted(set(model_names(self.root)) | set(self.status) | set(self.model_reason)):
            versions = self.status.get(name, {})
            for version in sorted(versions, key=int):
                st = versions[version]
                if not ready_only or st.state == READY:
                    out.append({"name": name, "version": version, "state": st.state, "reason": st.reason})
            if name in self.model_reason and not ready_only:
                out.append({"name": name, "version": "", "state": UNAVAILABLE, "reason": self.model_reason[name]})
            elif not versions and not ready_only:
                out.append({"name": name, "version": "", "state": "", "reason": ""})
        return out

    # ---- polling ------------------------------------------------------------------------------
    def _disk_state(self, name: str) -> object:
        folder = self._folder(name)
        config = folder / CONFIG_FILENAME
        files = fingerprint(folder)
        config_fp = [f for f in files if f[0] == config.name]
        return (tuple(config_fp), tuple(sorted((v, d.fingerprint) for v, d in versions_on_disk(folder).items())))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - a poll that fails must not stop the next one
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Act on every model whose folder changed since the last poll, once it has read the same
        twice (disk.py: half-written files are never loaded)."""
        async with self._lock:
            names = set(model_names(self.root)) | {m.name for m in self.core.models()} | set(self._seen)
            first = {n: self._disk_state(n) for n in names}
            changed = sorted(n for n in names if first[n] != self._seen.get(n))
            if not changed:
                return
            await asyncio.sleep(min(1.0, self.settings.repository_poll_seconds))
            for name in changed:
                state = self._disk_state(name)
                if state != first[name]:
                    log.info("model %s is still changing on disk; looking again at the next poll", name)
                    continue
                self._seen[name] = state
                log.info("model %s changed in the repository (read twice, the same)", name)
                folder = self._folder(name)
                if not versions_on_disk(folder) and not (folder / CONFIG_FILENAME).exists():
                    await self._forget(name, state)
                    continue
                try:
                    await self._load(name)
                except ModelLoadFailed as e:
                    if getattr(e, "retry", False):
                        self._seen.pop(name, None)
                    # else logged and in the index; the next change of its files is tried again

    async def _forget(self, name: str, state: object) -> None:
        """The model's folder is gone (or empty): stop serving it, as Triton's poll mode does."""
        if self.barrier is not None:
            why = await self.barrier.agree(name, change_key(state), [])
            if why is not None:
                log.error("model %s: %s", name, why)
                self._seen.pop(name, None)
                return
            self.barrier.serving(name, change_key(state), [])
        self._seen.pop(name, None)
        self.model_reason.pop(name, None)
        self._retire(self.core.swap_versions(name, {}), "its folder left the repository")
        self._publish(name)
        if not self._folder(name).is_dir():
            self.status.pop(name, None)


def _read_layers(spec: ModelSpec) -> LayerModel | None:
    """The version's layers.onnx companion, or None (explanations then have no layers)."""
    try:
        return LayerModel.beside(spec)
    except Exception as e:  # noqa: BLE001 - ORT raises many types
        log.warning("%s/%s: cannot load its layers.onnx, explanations will have no layers: %s",
                    spec.name, spec.version, e)  # fmt: skip
        return None
