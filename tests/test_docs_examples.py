"""The documentation's code examples, run as written against a real server."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import httpx
import numpy as np
from PIL import Image

from tests.conftest import ROOT


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def photo_jpeg(width: int = 300, height: int = 200) -> bytes:
    """A non-square photo-like JPEG, so the server's centre crop matters."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([xx / width * 255, yy / height * 255, (xx + yy) % 97 * 2.6], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_v2_example_gives_predicts_answer(server, tmp_path):
    example = next(b for b in python_blocks((ROOT / "docs" / "v2.md").read_text()) if "image_to_tensor" in b)
    (tmp_path / "cat.jpg").write_bytes(photo_jpeg())
    (tmp_path / "example.py").write_text(example.replace("localhost:8001", server.grpc_target))
    out = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    printed = [line.split() for line in out.stdout.splitlines()]
    predict = httpx.post(
        f"{server.http}/predict?top_k=3", content=photo_jpeg(), headers={"Content-Type": "image/jpeg"}
    ).json()["results"][0]["predictions"]
    assert [(label, int(index)) for label, index, _ in printed] == [(p["label"], p["index"]) for p in predict]
    for (_, _, probability), p in zip(printed, predict):
        assert abs(float(probability) - p["probability"]) < 2e-6


def test_readme_v2_example_runs(server, tmp_path):
    example = next(b for b in python_blocks((ROOT / "README.md").read_text()) if "image_to_tensor" in b)
    (tmp_path / "cat.jpg").write_bytes(photo_jpeg(200, 320))
    (tmp_path / "example.py").write_text(example.replace("localhost:8001", server.grpc_target))
    out = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(":") == 6 and "b'" in out.stdout  # three "probability:index:label" strings


def test_image_to_tensor_is_the_servers_preprocessing(server):
    """The tensor from image_to_tensor, sent over v2, gives /predict's probabilities for the same image."""
    from service.inference.preprocess import image_to_tensor

    config = httpx.get(f"{server.http}/v2/models/cifar10/config").json()
    pre = json.loads(config["parameters"]["preprocessing"]["string_value"])
    image = photo_jpeg(640, 480)
    x = image_to_tensor(image, pre)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
        "outputs": [{"name": "probabilities"}],
    }
    v2 = np.asarray(httpx.post(f"{server.http}/v2/models/cifar10/infer", json=body).json()["outputs"][0]["data"])
    predict = httpx.post(
        f"{server.http}/predict?top_k=10", content=image, headers={"Content-Type": "image/jpeg"}
    ).json()["results"][0]["predictions"]
    by_index = np.zeros(10)
    for p in predict:
        by_index[p["index"]] = p["probability"]
    np.testing.assert_allclose(v2, by_index, atol=1e-6)
