"""Model control (service.model_control), end to end: a real server on a model repository the test
makes in a temporary folder, real tritonclient HTTP and gRPC calls, files dropped in as a deploy
pipeline would (a version written under a temporary name, then renamed into place)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import numpy as np
import onnx
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from service.cli import build_parser, settings_from_args
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2 as pb
from service.grpc_api.gen.cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from service.model_control.policy import PolicyError, VersionPolicy, parse_policy
from service.model_control.sync import sync_once
from service.settings import Settings
from tests.conftest import MODEL_PATH, ROOT, ServerProcess, png_bytes, wait_until

pytestmark = pytest.mark.skipif(not MODEL_PATH.is_file(), reason="bundled model models/cifar10/1/model.onnx missing")
ONE_PROCESS = ("--workers", "1", "--executor", "worker", "--drain-seconds", "0")
#: The default process model: front ends and a device executor that runs every model version.
DEVICE_EXECUTOR = ("--workers", "2", "--executor", "device", "--drain-seconds", "0")
PIXELS = np.zeros((1, 3, 32, 32), np.float32)
V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}


def add_version(model_dir: Path, version: int, broken: bool = False, answers: int | None = None) -> None:
    """Write the version under a temporary name, then rename it into place (what README asks of
    a deploy pipeline); ``broken``: a truncated model.onnx; ``answers``: the bundled model with its
    last layer's bias for that class raised so far that it is every image's top class, so an
    answer's class tells which version computed it."""
    staging = model_dir / f".{version}.tmp"
    staging.mkdir(parents=True)
    if broken:
        (staging / "model.onnx").write_bytes(MODEL_PATH.read_bytes()[:5000])
    elif answers is not None:
        write_answering(staging / "model.onnx", answers)
    else:
        shutil.copy(MODEL_PATH, staging / "model.onnx")
    os.rename(staging, model_dir / str(version))


def write_answering(path: Path, top_class: int) -> None:
    """The bundled model with its last layer's bias for ``top_class`` raised so far that it is
    every image's top class."""
    model = onnx.load(MODEL_PATH)
    bias = next(i for i in model.graph.initializer if i.name == "fc4.bias")
    values = onnx.numpy_helper.to_array(bias).copy()
    values[top_class] += 1000.0
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, path)


def v2_input(module) -> list:
    tensor = module.InferInput("input", [1, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(PIXELS)
    return [tensor]


@pytest.fixture
def serve():
    """Start servers for one test; any still running when it ends (a failed assertion) is stopped."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        started.append(ServerProcess(*args))
        return started[-1]

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.stop()


def index_of(s: ServerProcess) -> dict[tuple[str, str], dict]:
    return {(m["name"], m["version"]): m for m in httpx.post(f"{s.http}/v2/repository/index").json()}


# ---- version policy ----------------------------------------------------------------------------
def test_version_policies_choose_as_triton():
    available = [1, 2, 5]
    assert parse_policy({}, "c").choose(available) == [1, 2, 5]
    assert parse_policy({"version_policy": {"latest": {"num_versions": 2}}}, "c").choose(available) == [2, 5]
    specific = parse_policy({"version_policy": {"specific": {"versions": [5, 3]}}}, "c")
    assert specific.choose(available) == [5] and specific.missing(available) == [3]
    assert VersionPolicy("latest", num_versions=1).as_config() == {"latest": {"num_versions": 1}}
    for bad in (
        {"version_policy": {"latest": {"num_versions": 0}}},
        {"version_policy": {"newest": {}}},
        {"version_policy": {"all": {}, "latest": {}}},
        {"max_batch_size": 8},  # not read by cnnserve: refused, not ignored
    ):
        with pytest.raises(PolicyError, match="c: "):
            parse_policy(bad, "c")


def test_load_model_flag_repeats_and_needs_explicit_mode():
    args = build_parser().parse_args(
        ["serve", "--model-control-mode", "explicit", "--load-model", "a", "--load-model", "b,c"]
    )
    assert settings_from_args(args).load_model == ["a", "b", "c"]
    with pytest.raises(ValidationError, match="needs --model-control-mode explicit"):
        Settings(load_model=["a"])
    with pytest.raises(ValidationError, match="only model named"):
        Settings(model_control_mode="explicit", load_model="*,a")


class Load:
    """Eight callers in threads, each in a loop until stopped: three tritonclient HTTP v2 infer,
    three tritonclient gRPC v2 infer, one /predict, one Classify; the version each answer names
    is kept in ``answers``, with its top class in ``computed`` ((version, class)), every error in
    ``failures``."""

    KINDS = ("http", "http", "http", "grpc", "grpc", "grpc", "predict", "classify")

    def __init__(self, s: ServerProcess) -> None:
        self.s = s
        self.answers: list[str] = []
        self.computed: list[tuple[str, int]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self.image = png_bytes(np.full((32, 32, 3), 90, np.uint8))
        self.threads = [threading.Thread(target=self._caller, args=(k,)) for k in self.KINDS]
        for t in self.threads:
            t.start()

    def _caller(self, kind: str) -> None:
        s = self.s
        http = thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}")
        grpc_v2 = tgrpc.InferenceServerClient(s.grpc_target)
        channel = grpc.insecure_channel(s.grpc_target)
        classify = pb_grpc.ClassifierStub(channel).Classify
        try:
            while not self._stop.is_set():
                try:
                    if kind == "http":
                        result = http.infer("cifar10", v2_input(thttp))
                        version = result.get_response()["model_version"]
                        top = int(np.argmax(result.as_numpy("logits")))
                    elif kind == "grpc":
                        grpc_result = grpc_v2.infer("cifar10", v2_input(tgrpc))
                        version = grpc_result.get_response().model_version
                        top = int(np.argmax(grpc_result.as_numpy("logits")))
                    elif kind == "predict":
                        r = httpx.post(f"{s.http}/predict", files=[("file", ("a.png", self.image, "image/png"))])
                        r.raise_for_status()
                        version, top = r.json()["model_version"], r.json()["results"][0]["predictions"][0]["index"]
                    else:
                        request = pb.ClassifyRequest(images=[pb.Image(encoded=self.image)])
                        reply = classify(request, timeout=30)
                        version, top = reply.model_version, reply.results[0].predictions[0].index
                    self.computed.append((version, top))
                    self.answers.append(version)
                except Exception as e:  # noqa: BLE001 - every failure is the test's finding
                    self.failures.append(f"{kind}: {e}")
        finally:
            http.close()
            grpc_v2.close()
            channel.close()

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=60)


# ---- poll mode under load ----------------------------------------------------------------------
def new_then_broken_version(s: ServerProcess, model_dir: Path, load: Load, answers: int | None = None) -> int:
    """Under ``load``, in poll mode: version 2 dropped in (``answers``: see add_version) until it
    answers and for 100 answers more, then a broken version 3 until the index reports it and for
    50 answers more. No request may fail. Returns the number of answers before version 3 was reported."""
    served, failures = load.answers, load.failures
    try:
        assert wait_until(lambda: len(served) >= 50, timeout=60), failures
        add_version(model_dir, 2, answers=answers)
        assert wait_until(lambda: "2" in served[-8:], timeout=60), (failures, s.log)
        served_at = len(served)
        assert wait_until(lambda: len(served) >= served_at + 100, timeout=60), failures
        # A broken version 3 is reported and never served: answers keep naming 2.
        add_version(model_dir, 3, broken=True)
        assert wait_until(lambda: index_of(s).get(("cifar10", "3"), {}).get("state") == "UNAVAILABLE", timeout=30)
        broken_at = len(served)
        assert wait_until(lambda: len(served) >= broken_at + 50, timeout=60), failures
    finally:
        load.stop()
    assert failures == []
    return broken_at


def test_poll_swaps_in_a_new_version_under_load_with_no_failed_request(tmp_path, serve):
    model_dir = tmp_path / "cifar10"
    add_version(model_dir, 1)
    add_version(tmp_path / "extra", 1)
    (model_dir / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    s = serve("--model-repository", str(tmp_path), *ONE_PROCESS, "--model-control-mode", "poll",
                      "--repository-poll-seconds", "0.3")  # fmt: skip
    image = png_bytes(np.full((32, 32, 3), 90, np.uint8))
    load = Load(s)
    broken_at = new_then_broken_version(s, model_dir, load)
    answers = load.answers
    assert set(answers) == {"1", "2"}
    assert answers[broken_at:].count("2") == len(answers) - broken_at  # 3 never answered; 1 retired
    index = index_of(s)
    assert index[("cifar10", "2")]["state"] == "READY"
    assert index[("cifar10", "1")]["state"] == "UNAVAILABLE" and "version policy" in index[("cifar10", "1")]["reason"]
    assert "cannot load" in index[("cifar10", "3")]["reason"] and "/3/model.onnx" in index[("cifar10", "3")]["reason"]
    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http, pytest.raises(InferenceServerException) as e:
        http.infer("cifar10", v2_input(thttp), model_version="3")
    assert e.value.status() == "404"
    metrics = httpx.get(f"{s.http}/metrics").text
    assert 'cnnserve_model_version{model="cifar10"} 2.0' in metrics
    assert 'cnnserve_model_loads_total{model="cifar10",result="failed"} 1.0' in metrics
    assert 'cnnserve_model_unloads_total{model="cifar10"} 1.0' in metrics
    assert wait_until(lambda: "model cifar10 version 1 closed" in s.log, timeout=30), s.log
    # A model folder taken out of the repository is unloaded and leaves the index.
    os.rename(tmp_path / "extra", tmp_path / ".extra.removed")
    assert wait_until(lambda: ("extra", "1") not in index_of(s), timeout=30), s.log
    r = httpx.post(f"{s.http}/predict", params={"model": "extra"}, files=[("file", ("a.png", image, "image/png"))])
    assert r.status_code == 404, r.text
    assert 'cnnserve_model_unloads_total{model="extra"} 1.0' in httpx.get(f"{s.http}/metrics").text
    # A new model folder is loaded.
    os.rename(tmp_path / ".extra.removed", tmp_path / "added")
    assert wait_until(lambda: index_of(s).get(("added", "1"), {}).get("state") == "READY", timeout=30), s.log
    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        assert http.infer("added", v2_input(thttp)).get_response()["model_version"] == "1"
    assert s.stop() == 0, s.log


def test_front_ends_swap_together_under_load(tmp_path, serve):
    """Two front ends (--executor worker): each loads the new version, and swaps only once both
    have it; no request fails, no answer comes from the broken version."""
    model_dir = tmp_path / "cifar10"
    add_version(model_dir, 1)
    (model_dir / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    s = serve("--model-repository", str(tmp_path), "--workers", "2", "--executor", "worker", "--drain-seconds",
              "0", "--model-control-mode", "poll", "--repository-poll-seconds", "0.3")  # fmt: skip
    load = Load(s)
    answers, failures = load.answers, load.failures
    try:
        assert wait_until(lambda: len(answers) >= 50, timeout=60), failures
        add_version(model_dir, 2)
        swapped = "model cifar10 serves versions 2 (every front end has it)"
        assert wait_until(lambda: s.log.count(swapped) == 2, timeout=60), s.log
        swapped_at = len(answers)
        add_version(model_dir, 3, broken=True)
        assert wait_until(lambda: s.log.count("model cifar10 version 3 failed to load") == 2, timeout=60), s.log
        assert wait_until(lambda: len(answers) >= swapped_at + 100, timeout=60), failures
    finally:
        load.stop()
    assert failures == []
    assert set(answers) == {"1", "2"}
    assert answers[-50:] == ["2"] * 50
    # Together: both front ends had loaded version 2 before either served it (one stderr, in order).
    lines = s.lines
    loaded = [i for i, line in enumerate(lines) if "loaded cifar10/2 from" in line]
    served = [i for i, line in enumerate(lines) if swapped in line]
    assert len(loaded) == 2 and max(loaded) < min(served), s.log
    assert wait_until(lambda: s.log.count("model cifar10 version 1 closed") == 2, timeout=30), s.log  # each one's
    index = index_of(s)  # any front end answers; each has the same states
    assert index[("cifar10", "2")]["state"] == "READY" and index[("cifar10", "3")]["state"] == "UNAVAILABLE"
    assert s.stop() == 0, s.log


# ---- the device executor --------------------------------------------------------------------------
def version_stats(s: ServerProcess, version: str) -> dict:
    return httpx.get(f"{s.http}/v2/models/cifar10/versions/{version}/stats").json()["model_stats"][0]


def test_device_executor_swaps_versions_under_load(tmp_path, serve):
    """Two front ends and a device executor (the default process model) in poll mode: the executor
    loads the new version once, beside the old, the front ends swap together, no request fails
    and every answer names the version that computed it (version 1 answers class 3 to every
    image, version 2 class 5). A broken version is reported and never served; a version taken
    out of the repository is released in the executor; statistics are the whole server's."""
    model_dir = tmp_path / "cifar10"
    add_version(model_dir, 1, answers=3)
    (model_dir / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    s = serve("--model-repository", str(tmp_path), *DEVICE_EXECUTOR, "--model-control-mode", "poll",
              "--repository-poll-seconds", "0.3")  # fmt: skip
    load = Load(s)
    broken_at = new_then_broken_version(s, model_dir, load, answers=5)
    answers = load.answers
    assert set(load.computed) == {("1", 3), ("2", 5)}  # each answer computed by the version it names
    assert answers[broken_at:] == ["2"] * (len(answers) - broken_at)
    assert s.log.count("cnnserve.executor: loaded cifar10/2 from") == 1, s.log  # once, for both front ends
    assert s.log.count("model cifar10 serves versions 2 (every front end has it)") == 2, s.log
    assert wait_until(lambda: "model cifar10 version 1 closed in device executor 0" in s.log, timeout=30), s.log
    index = index_of(s)
    assert index[("cifar10", "2")]["state"] == "READY"
    assert "cannot load" in index[("cifar10", "3")]["reason"] and "/3/model.onnx" in index[("cifar10", "3")]["reason"]
    # Version 2's statistics: both front ends' and the executor's rows, the same from either front
    # end (each request on a new connection; SO_REUSEPORT spreads them).
    counts = {version_stats(s, "2")["inference_count"] for _ in range(12)}
    assert len(counts) == 1 and counts.pop() == answers.count("2")
    # Version 2 leaves the repository: the policy's latest is version 1 again, loaded anew.
    shutil.rmtree(model_dir / "3")
    os.rename(model_dir / "2", model_dir / ".2.removed")
    assert wait_until(lambda: "model cifar10 version 2 closed in device executor 0" in s.log, timeout=60), s.log
    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        result = http.infer("cifar10", v2_input(thttp))
        assert result.get_response()["model_version"] == "1" and int(np.argmax(result.as_numpy("logits"))) == 3
    assert s.stop() == 0, s.log


def test_device_executor_loads_and_unloads_explicitly(tmp_path, serve):
    """Explicit mode with a device executor: a load through one front end is served by every one;
    unloading a version and then the model releases them in the executor; an executor killed
    meanwhile comes back serving the same versions."""
    add_version(tmp_path / "cifar10", 1, answers=3)
    s = serve("--model-repository", str(tmp_path), *DEVICE_EXECUTOR, "--model-control-mode", "explicit",
              "--load-model", "cifar10")  # fmt: skip

    def answers(version: str = "", n: int = 12) -> set:
        """(version, top class) of ``n`` requests, each on a new connection (any front end)."""
        out = set()
        for _ in range(n):
            r = httpx.post(f"{s.http}/v2/models/cifar10{f'/versions/{version}' if version else ''}/infer", json=V2_BODY)
            out.add((r.json()["model_version"], int(np.argmax(r.json()["outputs"][0]["data"])))
                    if r.status_code == 200 else r.status_code)  # fmt: skip
        return out

    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        assert answers() == {("1", 3)}
        add_version(tmp_path / "cifar10", 2, answers=5)
        http.load_model("cifar10")
        assert answers() == {("2", 5)} and answers("1") == {("1", 3)}
        r = httpx.post(f"{s.http}/v2/repository/models/cifar10/unload", json={"parameters": {"version": "1"}})
        assert r.status_code == 200, r.text
        assert answers("1") == {404} and answers() == {("2", 5)}
        assert wait_until(lambda: "model cifar10 version 1 closed in device executor 0" in s.log, timeout=30), s.log
        # A restarted executor loads what its predecessor served into the same slots: the front
        # ends' versions answer again once it is back.
        os.kill(s.children[("device executor", 0)], signal.SIGKILL)
        assert wait_until(lambda: s.log.count("executor 0 ready on") == 2, timeout=60), s.log
        assert wait_until(lambda: answers(n=1) == {("2", 5)}, timeout=30), s.log
        assert answers() == {("2", 5)}
        with tgrpc.InferenceServerClient(s.grpc_target) as g:
            g.unload_model("cifar10", unload_dependents=False)  # every version
        assert answers() == {404}
    assert wait_until(lambda: "model cifar10 version 2 closed in device executor 0" in s.log, timeout=30), s.log
    assert s.stop() == 0, s.log


def test_device_executor_never_serves_a_version_failing_its_precision_check(tmp_path, serve):
    """--precision int8: version 2's INT8 variant disagrees with its FP32 model (a stand-in that
    answers one class to everything), so the executor's check at load refuses it: the load answers
    why, the index says so, and version 1 keeps serving."""
    model_dir = tmp_path / "cifar10"
    shutil.copytree(MODEL_PATH.parent, model_dir / "1")  # its INT8 variant passes the check
    s = serve("--model-repository", str(tmp_path), *DEVICE_EXECUTOR, "--model-control-mode", "explicit",
              "--load-model", "cifar10", "--precision", "int8")  # fmt: skip
    staging = model_dir / ".2.tmp"
    shutil.copytree(MODEL_PATH.parent, staging)
    write_answering(staging / "model.int8.onnx", 5)
    os.rename(staging, model_dir / "2")
    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        with pytest.raises(InferenceServerException) as e:
            http.load_model("cifar10")
        assert e.value.status() == "400" and "agrees with fp32 on top-1 for only" in str(e.value), str(e.value)
    for _ in range(6):  # each on a new connection: SO_REUSEPORT spreads them over the front ends
        assert httpx.post(f"{s.http}/v2/models/cifar10/infer", json=V2_BODY).json()["model_version"] == "1"
    index = index_of(s)
    assert index[("cifar10", "1")]["state"] == "READY"
    assert index[("cifar10", "2")]["state"] == "UNAVAILABLE"
    assert "the int8 variant agrees with fp32 on top-1 for only" in index[("cifar10", "2")]["reason"]
    assert s.stop() == 0, s.log


# ---- explicit mode: the repository extension through tritonclient ------------------------------
def test_explicit_mode_loads_and_unloads_through_tritonclient(tmp_path, serve):
    add_version(tmp_path / "cifar10", 1)
    add_version(tmp_path / "other", 1)
    s = serve("--model-repository", str(tmp_path), *ONE_PROCESS, "--model-control-mode", "explicit",
                      "--load-model", "cifar10")  # fmt: skip
    http = thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}")
    g = tgrpc.InferenceServerClient(s.grpc_target)
    try:
        assert "model_repository" in http.get_server_metadata()["extensions"]
        index = http.get_model_repository_index()
        assert {"name": "cifar10", "version": "1", "state": "READY", "reason": ""} in index
        assert {"name": "other", "version": "", "state": "", "reason": ""} in index  # in the repository, not loaded
        assert not http.is_model_ready("other")
        g.load_model("other")
        assert g.is_model_ready("other")
        assert g.infer("other", v2_input(tgrpc)).get_response().model_version == "1"
        assert [(m.name, m.state) for m in g.get_model_repository_index().models] == [
            ("cifar10", "READY"),
            ("other", "READY"),
        ]

        # A broken new version: the load fails naming the file, the index says why, 1 keeps serving.
        add_version(tmp_path / "other", 2, broken=True)
        with pytest.raises(InferenceServerException) as e:
            http.load_model("other")
        assert e.value.status() == "400" and "other/2/model.onnx" in str(e.value)
        entry = {(m["name"], m["version"]): m for m in http.get_model_repository_index()}[("other", "2")]
        assert entry["state"] == "UNAVAILABLE" and "cannot load" in entry["reason"]
        ready_only = httpx.post(f"{s.http}/v2/repository/index", json={"ready": True}).json()
        assert [(m["name"], m["version"]) for m in ready_only] == [("cifar10", "1"), ("other", "1")]
        assert http.infer("other", v2_input(thttp)).get_response()["model_version"] == "1"

        # A malformed config.json: refused naming the file; what served keeps serving.
        (tmp_path / "other" / "config.json").write_text("{not json")
        with pytest.raises(InferenceServerException) as e:
            g.load_model("other")
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "config.json" in str(e.value)
        assert g.is_model_ready("other", "1")

        # Triton's own load parameters are refused with a reason, not ignored.
        with pytest.raises(InferenceServerException) as e:
            http.load_model("cifar10", config='{"max_batch_size": 2}')
        assert e.value.status() == "400" and "repository" in str(e.value)

        # Malformed requests: 400 naming what is wrong.
        r = httpx.post(f"{s.http}/v2/repository/models/cifar10/load", content=b"{")
        assert r.status_code == 400 and "not valid JSON" in r.text
        r = httpx.post(f"{s.http}/v2/repository/models/cifar10/unload", json={"parameters": {"version": 1}})
        assert r.status_code == 400 and "'version' must be a version number as a string" in r.text
        r = httpx.post(f"{s.http}/v2/repository/index", json={"ready": "yes"})
        assert r.status_code == 400 and "must be true or false" in r.json()["error"]

        # Unknown models: 404 / NOT_FOUND; the server keeps serving.
        with pytest.raises(InferenceServerException) as e:
            http.load_model("nope")
        assert e.value.status() == "404"
        with pytest.raises(InferenceServerException) as e:
            g.unload_model("../cifar10")
        assert e.value.status() == "StatusCode.NOT_FOUND"

        # One version (cnnserve's "version" parameter), then the whole model.
        r = httpx.post(f"{s.http}/v2/repository/models/other/unload", json={"parameters": {"version": "1"}})
        assert r.status_code == 200, r.text
        with pytest.raises(InferenceServerException) as e:
            http.infer("other", v2_input(thttp))
        assert e.value.status() == "404"
        http.unload_model("cifar10")
        # Its session closes a second or two later (idle twice): wait, so that the counts below are exact.
        assert wait_until(lambda: "model cifar10 version 1 closed" in s.log, timeout=30), s.log
        with pytest.raises(InferenceServerException) as e:
            g.infer("cifar10", v2_input(tgrpc))
        assert e.value.status() == "StatusCode.NOT_FOUND"
        index = {(m["name"], m["version"]): m for m in http.get_model_repository_index()}
        assert index[("cifar10", "1")] == {"name": "cifar10", "version": "1", "state": "UNAVAILABLE",
                                           "reason": "unloaded"}  # fmt: skip
        r = httpx.post(f"{s.http}/predict", files=[("file", ("a.png", png_bytes(np.zeros((32, 32, 3), np.uint8))))])
        assert r.status_code == 404 and "no model is loaded" in r.text
        g.load_model("cifar10")  # and back
        assert http.infer("cifar10", v2_input(thttp)).get_response()["model_version"] == "1"

        # A version whose files changed is reloaded in place: the new session serves, the old closes.
        shutil.copy(MODEL_PATH, tmp_path / "cifar10" / "1" / "model.onnx")  # new inode and mtime
        closed_before = s.log.count("model cifar10 version 1 closed")
        http.load_model("cifar10")
        assert wait_until(lambda: s.log.count("model cifar10 version 1 closed") == closed_before + 1, timeout=30)
        assert http.infer("cifar10", v2_input(thttp)).get_response()["model_version"] == "1"
        assert index_of(s)[("cifar10", "1")]["state"] == "READY"
        info = [
            (sample.labels["provider"], sample.labels["precision"], sample.value)
            for family in text_string_to_metric_families(httpx.get(f"{s.http}/metrics").text)
            if family.name == "cnnserve_model_info"
            for sample in family.samples
            if (sample.labels["model"], sample.labels["version"]) == ("cifar10", "1")
        ]
        # The retired session's series is not removed from under the new one (nor left beside it).
        assert info == [("CPUExecutionProvider", "fp32", 1.0)]

        # Old sessions' memory is released: reloads do not add up. Measured: flat within 10 MiB over
        # 12 reloads of this 16 MB model; without the release it grew by ~25 MiB a reload.
        before = s.memory()["VmRSS"]
        for reload in range(6):
            shutil.copy(MODEL_PATH, tmp_path / "cifar10" / "1" / "model.onnx")
            g.load_model("cifar10")
            closed = closed_before + 2 + reload
            assert wait_until(lambda n=closed: s.log.count("model cifar10 version 1 closed") == n, 30)
        assert s.memory()["VmRSS"] - before < 60, s.memory()
    finally:
        http.close()
        g.close()
    assert s.stop() == 0, s.log


def test_explicit_load_and_unload_reach_every_front_end(tmp_path, serve):
    """Two front ends: a load or unload answered by one has been applied by both (the shared
    operation log), so every new connection, wherever the kernel sends it, sees the change."""
    add_version(tmp_path / "cifar10", 1)
    s = serve("--model-repository", str(tmp_path), "--workers", "2", "--executor", "worker", "--drain-seconds",
              "0", "--model-control-mode", "explicit", "--load-model", "cifar10")  # fmt: skip
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}

    def answers(n: int = 24) -> list:
        """``n`` requests, each on a new connection (SO_REUSEPORT spreads them over the front ends)."""
        out = []
        for _ in range(n):
            r = httpx.post(f"{s.http}/v2/models/cifar10/infer", json=body)
            out.append(r.json()["model_version"] if r.status_code == 200 else r.status_code)
        return out

    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        assert set(answers()) == {"1"}
        add_version(tmp_path / "cifar10", 2)
        http.load_model("cifar10")
        assert set(answers()) == {"2"}
        assert s.log.count("model cifar10 serves versions 1, 2 (every front end has it)") == 2, s.log
        add_version(tmp_path / "cifar10", 3, broken=True)
        with pytest.raises(InferenceServerException) as e:
            http.load_model("cifar10")
        assert e.value.status() == "400" and "cifar10/3/model.onnx" in str(e.value)
        assert set(answers()) == {"2"}
        with tgrpc.InferenceServerClient(s.grpc_target) as g:
            g.unload_model("cifar10")
        assert set(answers()) == {404}
    assert s.stop() == 0, s.log


# ---- off unless enabled ------------------------------------------------------------------------
def test_load_and_unload_are_off_without_explicit_mode(tmp_path, serve):
    add_version(tmp_path / "cifar10", 1)
    s = serve("--model-repository", str(tmp_path), *ONE_PROCESS)
    http = thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}")
    g = tgrpc.InferenceServerClient(s.grpc_target)
    try:
        with pytest.raises(InferenceServerException) as e:
            http.load_model("cifar10")
        assert e.value.status() == "403" and "--model-control-mode explicit" in str(e.value)
        with pytest.raises(InferenceServerException) as e:
            g.unload_model("cifar10")
        assert e.value.status() == "StatusCode.PERMISSION_DENIED"
        assert http.is_model_ready("cifar10")  # still serving
        assert [m.state for m in g.get_model_repository_index().models] == ["READY"]
    finally:
        http.close()
        g.close()
    assert s.stop() == 0, s.log


def test_sync_repository_publishes_new_versions_only(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    for version in (1, 2):
        (source / "m" / str(version)).mkdir(parents=True)
        (source / "m" / str(version) / "model.onnx").write_bytes(b"v%d" % version)
    (source / "m" / "config.json").write_text('{"version_policy": {"latest": {"num_versions": 1}}}')
    assert sync_once(source, target) == ["m/1: published", "m/2: published", "m/config.json: published"]
    assert (target / "m" / "2" / "model.onnx").read_bytes() == b"v2"
    assert sync_once(source, target) == []
    (source / "m" / "2" / "model.onnx").write_bytes(b"rewritten")
    shutil.rmtree(source / "m" / "1")
    done = sync_once(source, target, delete=True)
    assert done[0].startswith("m/2: differs") and done[1:] == ["m/1: removed"]
    assert (target / "m" / "2" / "model.onnx").read_bytes() == b"v2"  # immutable: never rewritten
    assert sorted(p.name for p in (target / "m").iterdir()) == ["2", "config.json"]  # no staging left


# ---- the Kubernetes example (deploy/model-control), its steps run here -------------------------
def test_kubernetes_example_steps_publish_a_new_version(tmp_path, serve, monkeypatch):
    """Render cpu + deploy/model-control, check its settings, then run its init container's and
    sidecar's commands as written, with their volumes mapped to folders here, against a poll-mode
    server: the seeded model serves, then a version put in the store is served."""
    from tests.test_deploy import effective_settings, render

    docs = render("cpu+model-control", tmp_path / "kustomize")
    settings = effective_settings(docs, monkeypatch)
    monkeypatch.undo()  # the pod's CNNSERVE_* environment must not reach the server started below
    assert (settings.model_control_mode, settings.model_repository) == ("poll", "/repository")
    assert settings.executor == "auto"  # the overlay's process model stands: every one takes new versions
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "cnnserve")
    assert {"name": "repository", "mountPath": "/repository", "readOnly": True} in server["volumeMounts"]
    seed = next(c for c in pod["initContainers"] if c["name"] == "seed-repository")["command"]
    sidecar_container = next(c for c in pod["initContainers"] if c["name"] == "repository-sync")
    assert sidecar_container["restartPolicy"] == "Always"  # a native sidecar: it keeps running
    sidecar = sidecar_container["command"]
    assert next(v for v in pod["volumes"] if v["name"] == "model-store")["persistentVolumeClaim"]["readOnly"]

    volumes = {"/models": ROOT / "models", "/repository": tmp_path / "repository", "/model-store": tmp_path / "store"}

    def run_step(command: list[str]) -> str:
        assert command[:2] == ["cnnserve", "sync-repository"]
        args = [str(volumes.get(a, a)) for a in command[2:]]
        if "--every" in args:  # the sidecar's loop, one round of it
            del args[args.index("--every") : args.index("--every") + 2]
        out = subprocess.run([sys.executable, "-m", "service.cli", "sync-repository", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "cifar10/1: published" in run_step(seed)
    s = serve("--model-repository", str(volumes["/repository"]), *ONE_PROCESS, "--model-control-mode", "poll",
              "--repository-poll-seconds", "0.3")  # fmt: skip
    with thttp.InferenceServerClient(f"127.0.0.1:{s.http_port}") as http:
        assert http.infer("cifar10", v2_input(thttp)).get_response()["model_version"] == "1"
        (volumes["/model-store"] / "cifar10" / "2").mkdir(parents=True)
        shutil.copy(MODEL_PATH, volumes["/model-store"] / "cifar10" / "2" / "model.onnx")
        assert "cifar10/2: published" in run_step(sidecar)
        assert run_step(sidecar) == ""  # nothing new: nothing done
        assert wait_until(lambda: http.infer("cifar10", v2_input(thttp)).get_response()["model_version"] == "2", 30)
    assert not any(p.name.startswith(".") for p in (volumes["/repository"] / "cifar10").iterdir())  # no leftovers
    assert s.stop() == 0, s.log
