"""Accuracy of an ONNX model on a CIFAR-10 split, through onnxruntime (numpy only, no torch).

Preprocessing is read from the model's own metadata, exactly as the server does it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.data import load_split
from service.inference.preprocess import Normalizer


def predict(
    model_path: str | Path, images: np.ndarray, batch_size: int = 500, classes: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Predicted class indices and the model's labels. ValueError, saying why, for a model that
    cannot be evaluated on these images (no cnnserve metadata, other classes, another input size)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    if "labels" not in meta or "preprocessing" not in meta:
        raise ValueError(
            f"{model_path} has no cnnserve metadata (labels, preprocessing): cnnserve import-model adds it"
        )
    labels = json.loads(meta["labels"])
    pre = json.loads(meta["preprocessing"])
    if classes is not None and list(labels) != list(classes):
        raise ValueError(f"{model_path} classifies {len(labels)} classes {labels[:4]}...; the data has {list(classes)}")
    size = [d for d in session.get_inputs()[0].shape[2:] if isinstance(d, int)]
    if size and tuple(size) != images.shape[1:3]:
        raise ValueError(
            f"{model_path} takes {size[0]}x{size[-1]} images; the data's are {images.shape[1]}x{images.shape[2]}"
        )
    normalizer = Normalizer(pre)  # the server's own preprocessing
    preds = []
    for i in range(0, len(images), batch_size):
        x = normalizer(images[i : i + batch_size])
        preds.append(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1))
    return np.concatenate(preds), labels


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels * n + preds, minlength=n * n).reshape(n, n)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if cm[i, j] > threshold else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(model_path: str | Path, data: str | Path, split: str = "val", batch_size: int = 500) -> dict:
    ds = load_split(data, split)
    preds, labels = predict(model_path, ds.images, batch_size, classes=ds.classes)
    return summarize(model_path, data, split, ds.labels, preds, labels)


def summarize(
    model_path: str | Path, data: str | Path, split: str, truth: np.ndarray, preds: np.ndarray, labels: list[str]
) -> dict:
    """The evaluation record (top-1, per-class accuracy, confusion matrix) of predictions."""
    n = len(labels)
    cm = confusion_matrix(truth, preds, n)
    per_class = (np.diag(cm) / np.maximum(cm.sum(1), 1)).tolist()
    return {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "images": len(truth),
        "top1": float((preds == truth).mean()),
        "classes": labels,
        "per_class": dict(zip(labels, per_class)),
        "confusion_matrix": cm.tolist(),
    }


def format_report(result: dict) -> str:
    classes = result["classes"]
    lines = [
        f"{result['model']} on {result['split']} ({result['images']} images): top-1 {100 * result['top1']:.2f}%",
        "",
        "per-class accuracy:",
    ]
    lines += [f"  {c:<11} {100 * a:6.2f}%" for c, a in result["per_class"].items()]
    lines += [
        "",
        "confusion matrix (rows: true, columns: predicted):",
        " " * 12 + " ".join(f"{c[:5]:>5}" for c in classes),
    ]
    for c, row in zip(classes, result["confusion_matrix"]):
        lines.append(f"  {c:<10}" + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = evaluate(args.model, args.data, args.split, args.batch_size)
    print(format_report(result))
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_confusion(
            np.array(result["confusion_matrix"]),
            result["classes"],
            out / "confusion_matrix.png",
            f"validation top-1 {100 * result['top1']:.2f}% ({result['images']} images)",
        )
        print(f"\nwrote {out / 'evaluation.json'} and {out / 'confusion_matrix.png'}")
    return 0
