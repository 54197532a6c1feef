"""The supervisor's decisions, the executor's queue and the shared-memory layout, without
starting processes: the restart/backoff/halt policy and the hang rule as plain functions; a
real ModelQueue on a real ONNX Runtime session answering a socket pair; a stalled reader."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service.inference.priority import BACKGROUND_NICE
from service.inference.repository import ModelSpec
from service.metrics import ModelStats
from service.settings import Settings
from service.workers import executor as ex
from service.workers import model_queue as mq
from service.workers import policy, shared_memory
from tests.conftest import MODEL_PATH, ROOT

# ---- the hang rule ----------------------------------------------------------------------------------


def test_hung_judges_only_started_processes_and_loops_that_beat():
    names = ["I/O thread", "compute thread for cifar10/1"]
    now = 1000.0
    beats, busy = np.array([now - 100.0, 0.0]), np.zeros(2, np.int64)
    assert policy.hung(now, shared_memory.STARTING, beats, busy, 30.0, names) is None  # loading may take minutes
    assert policy.hung(now, shared_memory.HUNG, beats, busy, 30.0, names) is None  # already being aborted
    why = policy.hung(now, shared_memory.READY, beats, busy, 30.0, names)
    assert why is not None and why.startswith("its I/O thread has not beaten for 100.0s")
    fresh = np.array([now - 1.0, 0.0])  # a compute thread that never beat is not judged
    assert policy.hung(now, shared_memory.READY, fresh, busy, 30.0, names) is None
    assert policy.hung(now, shared_memory.LISTENING, np.array([now - 31.0]), busy[:1], 30.0, ["event loop"])


def test_hung_names_the_batch_a_compute_thread_is_stuck_in():
    now = 50.0
    why = policy.hung(now, shared_memory.READY, np.array([now, now - 40.0]), np.array([0, 64]), 30.0,
                      ["I/O thread", "compute thread for cifar10/1"])  # fmt: skip
    assert why == ("its compute thread for cifar10/1 has not beaten for 40.0s running a batch of 64 image(s) "
                   "(--hang-timeout-seconds 30)")  # fmt: skip
    assert (
        policy.hung(now, shared_memory.READY, np.array([now, now - 29.0]), np.array([0, 64]), 30.0, ["a", "b"]) is None
    )


# ---- restart, backoff, halt ---------------------------------------------------------------------------


def test_first_crash_restarts_at_once_then_backoff_doubles_to_a_cap():
    p = policy.RestartPolicy(max_boot_failures=100)
    delays = [p.died(0, "front end 0", -9, uptime=1.0, was_ready=True, first_incarnation=False).delay
              for _ in range(8)]  # fmt: skip
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    # A process that lived long enough was healthy: the count starts again.
    healthy = p.died(0, "front end 0", -9, uptime=policy.STABLE_AFTER_S, was_ready=True, first_incarnation=False)
    assert healthy.delay == 0
    # Rows are counted apart.
    assert p.died(1, "front end 1", -9, uptime=1.0, was_ready=True, first_incarnation=False).delay == 0


def test_failure_at_start_up_halts_at_once_but_a_kill_from_outside_does_not():
    p = policy.RestartPolicy()
    d = p.died(0, "device executor 0", 1, uptime=2.0, was_ready=False, first_incarnation=True)
    assert d.halt == "device executor 0 failed at start-up (exit status 1)"
    assert p.died(1, "front end 0", -signal.SIGKILL, uptime=2.0, was_ready=False, first_incarnation=True).halt is None


def test_boot_failures_in_a_row_halt_and_a_ready_incarnation_resets_the_count():
    p = policy.RestartPolicy(max_boot_failures=3)

    def died(ready: bool) -> policy.Decision:
        return p.died(0, "device executor 0", 1, uptime=0.5, was_ready=ready, first_incarnation=False)

    assert died(False).halt is None and died(False).halt is None
    assert died(True).halt is None  # ready once: not a boot failure, the count restarts
    assert died(False).halt is None and died(False).halt is None
    assert died(False).halt == "device executor 0 failed at boot 3 times in a row (last exit status 1)"


def test_exit_statuses_in_words():
    assert policy.describe_exit(1) == "exit status 1"
    assert policy.describe_exit(-9) == "SIGKILL (exit status -9)"
    bus = policy.describe_exit(-signal.SIGBUS, shm_free=3 << 20)
    assert bus.startswith("SIGBUS (exit status -7): shared memory ran out (/dev/shm: 3 MiB free)")
    assert "no room in shared memory" in policy.describe_exit(shared_memory.EXIT_NO_SHARED_MEMORY)


# ---- shared-memory layout ------------------------------------------------------------------------------


def test_slab_layout_is_aligned_disjoint_and_sized_as_announced(tmp_path):
    slabs = shared_memory.Slabs(tmp_path / "s.slab", 5, 3072, 10, create=True)
    assert (tmp_path / "s.slab").stat().st_size == shared_memory.Slabs.size(5, 3072, 10)
    arrays = [slabs.inputs, slabs.logits, slabs.probabilities, slabs.ranked, slabs.order, slabs.cancelled]
    spans = sorted((a.__array_interface__["data"][0], a.nbytes) for a in arrays)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(s1 + n1 <= s2 for (s1, n1), (s2, _) in itertools.pairwise(spans))  # no overlap
    for a in arrays:  # writing every cell of one array leaves the others untouched
        a[...] = 1
    slabs.cancelled[...] = 0
    assert slabs.inputs.sum() == 5 * 3072 and slabs.order.sum() == 50


def test_control_table_counts_depth_and_readiness(tmp_path):
    shape = shared_memory.TableShape(str(tmp_path / "control"), 1, 2, 1, ModelStats.width(8))
    table = shared_memory.ControlTable(shape, create=True)
    other = shared_memory.ControlTable(shape)  # another process's view of the same file
    table.submitted[:, 0] = [5, 3]
    table.taken[:, 0] = [4, 3]
    assert other.queue_depth(0) == 1
    assert not other.executors_ready()
    table.state[0] = shared_memory.READY  # the executor; the front ends are still starting
    assert other.executors_ready() and not other.all_ready()
    table.heartbeat(2)
    assert 0 < time.monotonic() - other.beat[2, shared_memory.LOOP] < 1
    assert other.beat.shape == (3, 1 + shared_memory.LANES)


# ---- the executor's queue ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("executor")
    settings = Settings(providers=["cpu"], intra_op_threads=1, precision="fp32", max_batch_size=8)
    table = shared_memory.ControlTable(
        shared_memory.TableShape(str(folder / "control"), 1, 1, 1, ModelStats.width(8)), create=True
    )
    e = ex.Executor(settings, table, 0, [ModelSpec("cifar10", "1", MODEL_PATH)])
    e.load()
    e.queues[0].start()
    e.folder = folder  # type: ignore[attr-defined]
    yield e
    e.stopping.set()
    e.queues[0].join(5)


def _submit(
    e: ex.Executor, classes: int, n: int = 3, kind: int = shared_memory.KIND_REQUEST
) -> tuple[np.ndarray, shared_memory.Slabs, socket.socket]:
    """Hand ``n`` images to the real queue from a front end whose slabs hold ``classes`` results;
    returns the DONE records it answers, its slabs and the front end's socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fe = mq.Frontend(theirs)
    fe.index = 0
    fe.slabs = shared_memory.Slabs(e.folder / f"fe-{classes}.slab", 8, 3072, classes, create=True)  # type: ignore[attr-defined]
    fe.slabs.inputs[:n] = np.random.default_rng(0).normal(size=(n, 3072)).astype(np.float32)
    records = np.zeros(n, shared_memory.SUBMIT)
    records["request"], records["slot"], records["index"], records["kind"] = np.arange(1, n + 1), np.arange(n), 0, kind
    before = int(e.table.taken[0, 0])
    e.queues[0].put(mq.Chunk(fe, records, time.monotonic()))
    ours.settimeout(10)
    message = ours.recv(shared_memory.MAX_MESSAGE_BYTES)
    assert message[:1] == shared_memory.MSG_DONE
    assert e.table.taken[0, 0] - before == n  # the shared queue counter moved by exactly n
    return np.frombuffer(message, shared_memory.DONE, offset=1), fe.slabs, ours


def test_queue_runs_a_batch_and_writes_results_back(executor):
    done, slabs, _ = _submit(executor, classes=10)
    assert sorted(done["request"].tolist()) == [1, 2, 3] and set(done["status"].tolist()) == {shared_memory.STATUS_OK}
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: slabs.inputs[:3].reshape(3, 3, 32, 32)})[0]
    np.testing.assert_allclose(slabs.logits[:3], logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(slabs.probabilities[:3].sum(axis=1), 1.0, rtol=1e-5)
    assert (slabs.order[:3, 0] == logits.argmax(axis=1)).all()


def test_an_exception_after_the_batch_is_taken_still_answers_every_request(executor, caplog):
    # Slabs with room for 3 classes where the model gives 10: the write-back after compute raises.
    with caplog.at_level(logging.ERROR, logger="cnnserve.executor"):
        done, _, _ = _submit(executor, classes=3)
    assert set(done["status"].tolist()) == {shared_memory.STATUS_FAILED} and len(done) == 3
    assert "a batch failed after it was taken; its requests are answered as failed" in caplog.text
    done, _, _ = _submit(executor, classes=10)  # and the queue goes on serving
    assert set(done["status"].tolist()) == {shared_memory.STATUS_OK}


def test_a_front_end_that_stops_reading_is_closed_and_told(caplog):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(0.2)
    fe = mq.Frontend(theirs)
    fe.index = 1
    payload = shared_memory.MSG_DONE + bytes(60_000)
    with caplog.at_level(logging.WARNING, logger="cnnserve.executor"):
        sent = 0
        while fe.send(payload):  # nobody reads `ours`: the buffer fills, then the send times out
            sent += 1
            assert sent < 10_000
    assert not fe.alive and "front end 1 dropped: it read nothing for" in caplog.text
    # The front end's side sees what was sent, then the end of the connection (so it fails its
    # waiting requests and reconnects) rather than silence.
    ours.settimeout(5)
    received = 0
    while ours.recv(shared_memory.MAX_MESSAGE_BYTES):
        received += 1
    assert received == sent
    assert not fe.send(payload)  # nothing more is sent on a dropped connection


def test_executor_queue_keeps_background_work_in_its_own_lane(executor):
    """Perturbed images of explanations (KIND_BACKGROUND) arrive first; a request's image that
    arrives later is still the requests thread's next batch, which holds no background work: the
    background lane has a thread of its own."""
    queue = mq.ModelQueue(executor, 0, executor.queues[0].runtime, ModelStats(np.zeros(ModelStats.width(8), np.int64)))
    _, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fe = mq.Frontend(theirs)

    def records(first: int, n: int, kind: int) -> np.ndarray:
        r = np.zeros(n, shared_memory.SUBMIT)
        r["request"], r["kind"] = np.arange(first, first + n), kind
        return r

    queue.put(mq.Chunk(fe, records(100, 10, shared_memory.KIND_BACKGROUND), time.monotonic()))
    queue.put(mq.Chunk(fe, records(1, 3, shared_memory.KIND_REQUEST), time.monotonic()))
    mixed = records(200, 4, shared_memory.KIND_REQUEST)
    mixed["kind"][2:] = shared_memory.KIND_BACKGROUND  # one message may carry both kinds
    queue.put(mq.Chunk(fe, mixed, time.monotonic()))
    taken = queue._take(0)
    assert taken is not None
    assert np.concatenate([c.records["request"] for c in taken]).tolist() == [1, 2, 3, 200, 201]
    taken = queue._take(1)
    assert taken is not None
    assert np.concatenate([c.records["request"] for c in taken]).tolist() == list(range(100, 108))
    assert queue.queued == [0, 12 - 8]


def test_background_compute_thread_runs_at_a_lower_os_priority(executor):
    """The CPU goes to the requests' compute thread first: the background one is niced."""
    requests, background = executor.queues[0].threads
    assert background.name.endswith("-background") and background.native_id is not None
    assert requests.native_id is not None
    nice = os.getpriority(os.PRIO_PROCESS, background.native_id)
    assert nice == os.getpriority(os.PRIO_PROCESS, requests.native_id) + BACKGROUND_NICE or nice == 19
    # And it computes: a background image is answered.
    done, _, _ = _submit(executor, classes=10, kind=shared_memory.KIND_BACKGROUND)
    assert set(done["status"].tolist()) == {shared_memory.STATUS_OK}


def test_explanations_hand_their_images_to_the_queue_as_background_work(executor):
    """The explainer submits its perturbed images through ``InferenceCore.run`` with
    Priority.BACKGROUND, which reaches the model's queue (any BatchQueue: local or remote);
    a request's own images go as Priority.REQUEST."""
    import asyncio

    from service.errors import Overloaded
    from service.explain.explainer import Explainer
    from service.explain.layers import LayerModels
    from service.inference.core import InferenceCore
    from service.inference.decoding import DecodePool
    from service.inference.priority import Priority
    from service.inference.serving import LoadedModel
    from service.metrics import Metrics

    seen: list[Priority] = []

    class Queue:  # a BatchQueue that records each submit's priority, then refuses it
        max_batch_size, max_queue_delay_s, max_queue_size, queued_images = 8, 0.0, 64, 0

        def retry_after_s(self) -> float:
            return 1.0

        async def submit(self, items, deadline=None, priority=Priority.REQUEST):
            seen.append(priority)
            raise Overloaded("recorded")

        async def drain(self, timeout: float) -> bool:
            return True

        async def close(self) -> None:
            pass

    settings, metrics = Settings(providers=["cpu"], max_batch_size=8), Metrics()
    core = InferenceCore(settings, metrics, DecodePool(settings, metrics))
    model = LoadedModel(executor.queues[0].runtime, Queue(), ModelStats(max_batch_size=8))
    explainer = Explainer(core, LayerModels(), settings, metrics)
    image = np.zeros((32, 32, 3), np.uint8)

    async def main() -> None:
        with pytest.raises(Overloaded):
            await explainer._attribute(model, image, 5, None, "occlusion", 0, None)
        with pytest.raises(Overloaded):
            await core.run(model, image[None])

    asyncio.run(main())
    assert seen == [Priority.BACKGROUND, Priority.REQUEST]


def test_dataset_cache_is_filled_by_several_processes_without_a_shared_temporary_file(tmp_path, monkeypatch):
    """Front ends fill the sample-image cache at once: one writer's temporary file (here held as a
    folder, which nobody can overwrite) must not break another's, nor leave it without samples."""
    from PIL import Image

    from export import data

    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (i * 40, 9, 9)).save(tmp_path / "images" / c / f"{i}.png")
    monkeypatch.setenv("CNNSERVE_CACHE_DIR", str(tmp_path / "cache"))
    first = data.load_dataset(tmp_path / "images", use_cache=True)
    cached = next((tmp_path / "cache").glob("dataset-*.npz"))
    cached.unlink()
    cached.with_name(cached.stem + ".tmp.npz").mkdir()  # the name one shared temporary file had
    again = data.load_dataset(tmp_path / "images", use_cache=True)
    assert cached.exists() and (again.labels == first.labels).all() and again.classes == ("cat", "dog")
    leftovers = [p.name for p in (tmp_path / "cache").glob("*.tmp.npz")]
    assert leftovers == [cached.stem + ".tmp.npz"]  # only the stand-in: this writer's file was renamed


def test_run_folders_left_behind_are_told_from_live_ones(tmp_path):
    import subprocess
    import sys

    from service.workers import housekeeping

    def folder(name: str, owner: str | None) -> Path:
        path = tmp_path / f"cnnserve-{name}"
        path.mkdir()
        if owner is not None:
            (path / "owner").write_text(owner)
        return path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = folder("live", f"1 {shared_memory.process_start_time(1)}")
    reused = folder("reused", f"1 {shared_memory.process_start_time(1) + 1}")  # pid 1 of an earlier container
    gone = folder("gone", f"{dead.pid} 1")
    table = shared_memory.ControlTable(
        shared_memory.TableShape(str(folder("old", None) / "control"), 1, 1, 1, 8), create=True
    )
    assert not housekeeping.left_behind(live) and not housekeeping.left_behind(tmp_path / "cnnserve-old")
    assert housekeeping.left_behind(reused) and housekeeping.left_behind(gone)
    assert housekeeping.sweep_run_dirs(tmp_path)[0] == 2  # reused and gone; old is still mapped here
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnnserve-live", "cnnserve-old"]
    del table
    assert housekeeping.sweep_run_dirs(tmp_path)[0] == 1  # nothing maps it any more


def test_sample_images_are_decoded_once_per_machine(tmp_path):
    """Front ends ask for the page's samples at once: one decodes the data, the others wait on the
    cache's lock and read its ten PNGs (here: three processes, then a changed image that the
    cache, keyed on the data's path, size and time, keeps answering from)."""
    import subprocess
    import sys

    from PIL import Image

    for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 200, 0))):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / c / f"{i}.png")
    code = ("import sys, hashlib; from service.explain.samples import load_samples_once as f; print(hashlib"
            ".sha256(b''.join(s.label.encode() + s.png for s in f(sys.argv[1]))).hexdigest())")  # fmt: skip
    env = {**os.environ, "CNNSERVE_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "images")], env=env, text=True,
                              stdout=subprocess.PIPE) for _ in range(3)]  # fmt: skip
    digests = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(digests) == 1 and all(p.returncode == 0 for p in procs)
    assert len(list((tmp_path / "cache").glob("samples-*.npz"))) == 1
    Image.new("RGB", (32, 32), (0, 0, 200)).save(tmp_path / "images" / "cat" / "0.png")  # the folder's time stays
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path / "images")], env=env, text=True,
                           capture_output=True, timeout=120)  # fmt: skip
    assert again.stdout.strip() in digests, again.stderr  # from the cache, not decoded again


def test_a_front_ends_batch_that_does_not_come_back_is_judged_hung(tmp_path):
    """--executor worker: a front end computes its own batches. One handed to its batch thread
    that does not come back (here held by a gate) is a hang, named with its size; an idle batch
    thread, or one whose batch came back, is never judged."""
    import asyncio

    from service.inference.batcher import Batcher

    table = shared_memory.ControlTable(
        shared_memory.TableShape(str(tmp_path / "control"), 0, 1, 1, ModelStats.width(8)), create=True
    )
    names = policy.loop_names(False, ["cifar10/1"])
    gate = threading.Event()
    verdicts: list[str | None] = []

    def run(parts):
        gate.wait(10)
        return (np.concatenate(parts),)

    def judged(later: float) -> str | None:
        return policy.hung(time.monotonic() + later, shared_memory.READY, table.beat[0], table.busy[0], 30.0, names)

    async def main() -> None:
        b = Batcher(run, max_batch_size=8)
        b.on_batch = table.batch_watch(0, 0)
        b.start()
        verdicts.append(judged(60.0))  # idle: not judged however long
        request = asyncio.ensure_future(b.submit(np.zeros((3, 1))))
        await asyncio.sleep(0.1)  # handed to the batch thread, held there
        verdicts.append(judged(31.0))
        gate.set()
        await request
        verdicts.append(judged(60.0))
        await b.close()

    asyncio.run(main())
    assert verdicts[0] is None and verdicts[2] is None
    assert (
        verdicts[1] is not None
        and verdicts[1].startswith("its batch thread for cifar10/1 has not beaten for 31.")
        and "running a batch of 3 image(s)" in verdicts[1]
    ), verdicts
