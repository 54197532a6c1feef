"""Export a trained checkpoint to ONNX, with everything a server needs in the model's metadata.

Input ``input`` FP32 [N,3,32,32] (normalised), output ``logits`` FP32 [N,10], N dynamic.
Metadata: ``labels`` (JSON list, class index order) and ``preprocessing`` (JSON: scale, per-channel
mean/std, layout, colour order, size). The export runs torch and onnxruntime on a real batch of
validation images and refuses to write a model whose logits differ by more than 1e-4 or whose
argmax differs anywhere.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.data import load_split
from export.model import Cifar10CNN
from export.train import to_normalized_nchw
from service.inference.preprocess import Preprocessing

PARITY_ATOL = 1e-4
PARITY_IMAGES = 512


class ParityError(RuntimeError):
    pass


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parity_batch(data: str | None, mean: list[float], std: list[float], n: int = PARITY_IMAGES) -> torch.Tensor:
    """A real batch (validation images) when data is given, else seeded noise images."""
    if data:
        images = load_split(data, "val").images[:n]
    else:
        images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return to_normalized_nchw(images, mean, std)


def export(checkpoint: str | Path, output: str | Path, data: str | None = None, opset: int = 17) -> Path:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = Cifar10CNN()
    model.load_state_dict(ckpt["model"])
    model.eval()
    mean, std, classes = ckpt["mean"], ckpt["std"], ckpt["classes"]

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 32, 32),),
            str(tmp_path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=opset,
            dynamo=False,
        )
        proto = onnx.load(str(tmp_path))
        meta = {
            "labels": json.dumps(classes),
            "preprocessing": json.dumps(Preprocessing(mean=tuple(mean), std=tuple(std)).to_metadata()),
            "architecture": "cnnserve Cifar10CNN (conv32-conv32-pool-fc512-fc10)",
            "val_top1": f"{ckpt.get('val_acc', float('nan')):.4f}",
            "trained_epochs": str(ckpt.get("epoch", "")),
            "weights": str(ckpt.get("weights", "")),
        }
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = "CIFAR-10 classifier exported by cnnserve; see models/cifar10/README.md"
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp_path))

        x = parity_batch(data, mean, std)
        with torch.no_grad():
            expected = model(x).numpy()
        session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        got = session.run(["logits"], {"input": x.numpy()})[0]
        max_diff = float(np.abs(got - expected).max())
        same_argmax = bool((got.argmax(1) == expected.argmax(1)).all())
        print(f"parity on {len(x)} images: max |logits diff| = {max_diff:.2e}, identical argmax: {same_argmax}")
        if max_diff > PARITY_ATOL or not same_argmax:
            raise ParityError(
                f"ONNX model disagrees with torch (max diff {max_diff:.2e}, "
                f"argmax identical: {same_argmax}); not written"
            )
        output.write_bytes(tmp_path.read_bytes())
    print(f"wrote {output} (opset {opset}, sha256 {sha256_of(output)})")
    return output
