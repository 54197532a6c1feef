"""Issue #2: architecture, data loaders (both formats, and the download path), training smoke run,
ONNX export parity, and the shipped model."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import pickle
import re
import tarfile
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export import data
from export.model import Cifar10CNN, parameter_count
from service.cli import main as cli_main
from tests.conftest import MODEL_PATH, ROOT, SHARED_CIFAR

SEED_STATE_DICT_KEYS = [
    "conv1.weight",
    "conv1.bias",
    "conv2.weight",
    "conv2.bias",
    "fc3.weight",
    "fc3.bias",
    "fc4.weight",
    "fc4.bias",
]


def test_architecture_is_the_seed_exactly():
    model = Cifar10CNN()
    assert parameter_count(model) == 4_210_090
    assert list(model.state_dict()) == SEED_STATE_DICT_KEYS
    names = [name for name, _ in model.named_children()]
    assert names == ["conv1", "act1", "drop1", "conv2", "act2", "pool2", "flat", "fc3", "act3", "drop3", "fc4"]
    assert (model.drop1.p, model.drop3.p) == (0.3, 0.5)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.padding == (1, 1) and model.conv1.stride == (1, 1)
    assert model.fc3.in_features == 8192 and model.fc4.out_features == 10
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (4, 10)
        assert torch.equal(model(x), model(x))  # dropout is inactive in eval


# ---- generated data sets ------------------------------------------------------------------------
CLASSES = ["cat", "dog", "frog"]


def make_image_folder(root: Path, per_class: int = 4, split: str = "train") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pixels = {}
    for c in CLASSES:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            # PNG is lossless, so pixels can be compared exactly; one JPEG per class checks the format.
            if i == 0:
                Image.fromarray(arr).save(d / f"{i:04d}.jpg", quality=95)
            else:
                Image.fromarray(arr).save(d / f"{i:04d}.png")
                pixels[f"{c}/{i:04d}"] = arr
    return pixels


def make_tar(src: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tar:
        for p in sorted(src.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(src)), recursive=False)
    return target


def test_image_folder_from_a_folder_and_from_a_tar_gz(tmp_path):
    pixels = make_image_folder(tmp_path / "tree")
    tar = make_tar(tmp_path / "tree", tmp_path / "tree.tar.gz")
    for source in (tmp_path / "tree", tar):
        ds = data.load_image_folder(source)
        assert ds.classes == tuple(CLASSES) and len(ds) == 12
        assert np.bincount(ds.labels).tolist() == [4, 4, 4]
        assert ds.images.shape == (12, 32, 32, 3) and ds.images.dtype == np.uint8
        # File order within a class: 0000.jpg, 0001.png, ...
        assert np.array_equal(ds.images[1], pixels["cat/0001"])
        assert np.array_equal(ds.images[4 + 3], pixels["dog/0003"])
    assert data.detect_format(tar) == "image-folder"
    flat = data.load_image_folder(tmp_path / "tree" / "train")  # <class>/* without a split folder
    assert len(flat) == 12


def make_cifar_python(root: Path, per_batch: int = 6) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    all_rows = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, per_batch))
        (folder / name).write_bytes(pickle.dumps({b"data": rows, b"labels": labels, b"batch_label": name.encode()}))
        if name != "test_batch":
            all_rows.append(rows)
    meta = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder, np.concatenate(all_rows)


def test_cifar_python_archive_folder_and_tar(tmp_path):
    folder, rows = make_cifar_python(tmp_path)
    tar = make_tar(tmp_path, tmp_path.parent / f"{tmp_path.name}-cifar-10-python.tar.gz")
    for source in (folder, tar):
        ds = data.load_cifar_python(source)
        assert len(ds) == 30 and ds.classes == data.CIFAR10_CLASSES
        # Rows are planar R, G, B: pixel (0, 0) of image 0 is bytes 0, 1024 and 2048.
        assert ds.images[0, 0, 0].tolist() == [rows[0, 0], rows[0, 1024], rows[0, 2048]]
        assert ds.images[3, 31, 31].tolist() == [rows[3, 1023], rows[3, 2047], rows[3, 3071]]
        assert len(data.load_cifar_python(source, "test")) == 6
        assert data.detect_format(source) == "cifar-python"


def test_download_verifies_the_checksum(tmp_path):
    make_cifar_python(tmp_path / "src")
    (tmp_path / "serve").mkdir()
    archive = make_tar(tmp_path / "src", tmp_path / "serve" / "cifar-10-python.tar.gz")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "serve"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-python.tar.gz"
    try:
        got = data.download_cifar_python(tmp_path / "dl", url=url, md5=md5)
        assert got.read_bytes() == archive.read_bytes()
        assert len(data.load_dataset(got, use_cache=False)) == 30
        assert data.download_cifar_python(tmp_path / "dl", url=url, md5=md5) == got  # reused
        with pytest.raises(ValueError, match="checksum mismatch"):
            data.download_cifar_python(tmp_path / "bad", url=url, md5="0" * 32)
        assert not any((tmp_path / "bad").iterdir())
    finally:
        httpd.shutdown()


def test_stratified_split_is_fixed_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    train, val = data.stratified_split(labels, val_size=100, seed=0)
    assert len(val) == 100 and np.bincount(labels[val]).tolist() == [10] * 10
    assert not set(train) & set(val) and len(train) + len(val) == 1000
    _again_train, again_val = data.stratified_split(labels, val_size=100, seed=0)
    assert np.array_equal(val, again_val)


# ---- training and export -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_smoke(tmp_path_factory):
    """Two epochs on 200 synthetic images of 10 classes (class = dominant colour band)."""
    root = tmp_path_factory.mktemp("smoke")
    rng = np.random.default_rng(2)
    for c in range(10):
        d = root / "tree" / "train" / data.CIFAR10_CLASSES[c]
        d.mkdir(parents=True)
        for i in range(20):
            arr = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            arr[:, c * 3 : c * 3 + 3, c % 3] = 255
            Image.fromarray(arr).save(d / f"{i}.png")
    tar = make_tar(root / "tree", root / "smoke.tar.gz")
    out = root / "run"
    args = [
        "train",
        "--data",
        str(tar),
        "--out-dir",
        str(out),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--val-size",
        "50",
        "--threads",
        "2",
        "--weight-decay",
        "2e-4",
        "--label-smoothing",
        "0.05",
    ]
    assert cli_main(args) == 0
    return tar, out, args


def test_training_writes_metrics_plot_checkpoints_and_resumes(trained_smoke, capsys):
    _tar, out, args = trained_smoke
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert {"train_loss", "train_acc", "val_acc", "val_acc_ema", "lr", "elapsed_s"} <= set(json.loads(lines[0]))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert (config["weight_decay"], config["label_smoothing"]) == (2e-4, 0.05)
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["classes"] == list(data.CIFAR10_CLASSES) and len(best["mean"]) == 3
    assert cli_main(args) == 0  # same configuration: resumes from last.pt, nothing left to do
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_export_checks_parity_and_writes_metadata(trained_smoke, tmp_path, capsys):
    tar, out, _ = trained_smoke
    target = tmp_path / "m" / "model.onnx"
    assert cli_main(["export", "--checkpoint", str(out / "best.pt"), "--output", str(target), "--data", str(tar)]) == 0
    assert "identical argmax: True" in capsys.readouterr().out
    proto = onnx.load(str(target))
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == list(data.CIFAR10_CLASSES)
    pre = json.loads(meta["preprocessing"])
    assert pre["scale"] == pytest.approx(1 / 255) and len(pre["mean"]) == len(pre["std"]) == 3
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert outp.name == "logits" and outp.shape[1:] == [10]

    # The model card of this run: figures from its evaluation, recipe and command from its config.
    from export.model_card import render

    assert (
        cli_main(["evaluate", "--model", str(target), "--data", str(tar), "--split", "all", "--out-dir", str(tmp_path)])
        == 0
    )
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    card = render(out, target, evaluation, tmp_path, "a test machine")
    assert f"**{100 * evaluation['top1']:.2f} %**" in card
    assert hashlib.sha256(target.read_bytes()).hexdigest() in card
    assert "weight decay 0.0002" in card and "label smoothing 0.05." in card
    assert "batch 32," in card
    assert "--epochs 2 --batch-size 32 --weight-decay 0.0002 --label-smoothing 0.05 --out-dir" in card


# ---- the shipped model ------------------------------------------------------------------------
def test_shipped_model_loads_carries_metadata_and_is_batch_consistent():
    session = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["labels"]) == list(data.CIFAR10_CLASSES)
    assert set(json.loads(meta["preprocessing"])) >= {"scale", "mean", "std"}
    x = np.random.default_rng(3).standard_normal((64, 3, 32, 32)).astype(np.float32)
    whole = session.run(None, {"input": x})[0]
    parts = np.concatenate([session.run(None, {"input": x[a:b]})[0] for a, b in ((0, 1), (1, 8), (8, 64))])
    assert whole.shape == (64, 10)
    assert np.allclose(whole, parts, atol=1e-5)


def test_shipped_model_card_matches_the_file_and_its_accuracy_reproduces():
    card = (ROOT / "models" / "cifar10" / "README.md").read_text()
    assert hashlib.sha256(MODEL_PATH.read_bytes()).hexdigest() in card
    stated = float(re.search(r"Validation top-1:\s*\*\*([\d.]+)\s*%\*\*", card).group(1))
    if not SHARED_CIFAR.exists():
        pytest.skip(f"CIFAR-10 images not present at {SHARED_CIFAR}; cannot measure accuracy")
    from export.evaluate import evaluate

    result = evaluate(MODEL_PATH, SHARED_CIFAR, "val")
    assert result["images"] == 5000
    assert 100 * result["top1"] >= stated - 0.5
