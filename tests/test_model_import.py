"""`cnnserve import-model` on a second, different ONNX classifier built here (other input size,
labels and channel order, a fixed batch dimension), then served and asked through /predict."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.inference.repository import ModelSpec
from service.inference.runtime import ModelRuntime
from service.settings import Settings
from tests.conftest import ROOT, ServerProcess, png_bytes

# Model channel order is BGR: its scores are [blue, green, red, dark] from the mean of each channel.
LABELS = ["blue", "green", "red", "dark"]


def colour_model(path, size=(24, 20), batch=1) -> None:
    """A tiny classifier: global average pool, then 4 scores from the 3 channel means."""
    weights = np.array([[8, 0, 0, -3], [0, 8, 0, -3], [0, 0, 8, -3]], np.float32)  # [3 channels, 4 classes]
    bias = np.array([0, 0, 0, 1.5], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "W", "b"], ["scores"]),
        ],
        "colours",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, *size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 4])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def run_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "import-model", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def solid(rgb, height, width) -> bytes:
    return png_bytes(np.full((height, width, 3), rgb, np.uint8))


@pytest.fixture
def source(tmp_path):
    colour_model(tmp_path / "colours.onnx")
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return tmp_path


def test_imported_model_is_served_and_classifies_through_predict(source, tmp_path):
    repo = tmp_path / "repo"
    out = run_import(
        str(source / "colours.onnx"),
        "--labels",
        str(source / "labels.txt"),
        "--name",
        "colours",
        "--repository",
        str(repo),
        "--mean",
        "0,0,0",
        "--std",
        "1,1,1",
        "--channel-order",
        "bgr",
    )
    assert out.returncode == 0, out.stderr
    assert "imported colours/1" in out.stdout and "[-1, 3, 24, 20]" in out.stdout
    assert (repo / "colours" / "1" / "model.onnx").exists()

    s = ServerProcess("--model-repository", str(repo), "--drain-seconds", "0")
    try:
        for rgb, expected in (((230, 20, 20), "red"), ((10, 200, 30), "green"), ((20, 20, 240), "blue")):
            r = httpx.post(
                f"{s.http}/predict?top_k=2", content=solid(rgb, 60, 90), headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "colours"
            assert r.json()["results"][0]["predictions"][0]["label"] == expected, r.json()
        r = httpx.post(f"{s.http}/predict", content=solid((5, 5, 5), 24, 20), headers={"Content-Type": "image/png"})
        assert r.json()["results"][0]["predictions"][0]["label"] == "dark"
        config = httpx.get(f"{s.http}/v2/models/colours/config").json()
        assert config["input"][0]["dims"] == [3, 24, 20]
    finally:
        assert s.stop() == 0, s.log


def test_import_refuses_what_it_cannot_serve(source, tmp_path):
    base = ["--labels", str(source / "labels.txt"), "--name", "c", "--repository", str(tmp_path / "r")]
    norm = ["--mean", "0,0,0", "--std", "1,1,1"]
    out = run_import(str(source / "colours.onnx"), *base, *norm, "--input-size", "32")
    assert out.returncode == 1 and "--input-size 32x32 does not match the model's input" in out.stderr
    (source / "three.txt").write_text("a\nb\nc\n")
    out = run_import(str(source / "colours.onnx"), *base[2:], "--labels", str(source / "three.txt"), *norm)
    assert out.returncode == 1 and "4 classes but the labels file 3" in out.stderr
    out = run_import(str(source / "colours.onnx"), *base, "--mean", "0,0", "--std", "1,1,1")
    assert out.returncode == 1 and "--mean must be three comma-separated numbers" in out.stderr
    (source / "broken.onnx").write_bytes((source / "colours.onnx").read_bytes()[:40])
    out = run_import(str(source / "broken.onnx"), *base, *norm)
    assert out.returncode == 1 and "cannot read" in out.stderr and "broken.onnx" in out.stderr
    assert not (tmp_path / "r").exists(), "nothing is written unless the model loads and runs"
    assert "Traceback" not in out.stderr


def test_a_model_without_metadata_is_refused_with_the_fix(source):
    with pytest.raises(ValueError, match=r"lacks labels and preprocessing; add them with `cnnserve import-model`"):
        ModelRuntime(ModelSpec("c", "1", source / "colours.onnx"), Settings(providers=["cpu"]))


def test_layers_and_evaluate_on_another_model_say_why_in_one_line(source, tmp_path):
    """The seed model's tools on another classifier: an error line, not a traceback."""
    norm = ["--input-size", "24x20", "--mean", "0,0,0", "--std", "1,1,1"]
    out = run_import(str(source / "colours.onnx"), "--labels", str(source / "labels.txt"), "--name", "colours",
                     *norm, "--repository", str(tmp_path / "repo"))  # fmt: skip
    assert out.returncode == 0, out.stderr
    model = tmp_path / "repo" / "colours" / "1" / "model.onnx"
    data_dir = tmp_path / "data"
    for c in ("cat", "dog"):
        (data_dir / c).mkdir(parents=True)
        (data_dir / c / "0000.png").write_bytes(solid((10, 20, 30), 32, 32))
    for args, expected in (
        (["layers", "--model", str(model)], "cnnserve layers: not the seed model's graph"),
        (["evaluate", "--model", str(model), "--data", str(data_dir), "--split", "all"], "classifies 4 classes"),
        (["evaluate", "--model", str(model), "--data", str(tmp_path / "none")], "cnnserve evaluate: "),
    ):
        run = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert run.returncode == 1 and expected in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)
