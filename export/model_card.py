"""Write the model card (models/<name>/README.md) from a training run and an evaluation.

    python -m export.model_card --run runs/cifar10 --model models/cifar10/1/model.onnx \
        --evaluation models/cifar10/evaluation.json

Copies the run's curves.png next to the card; every figure in the card comes from those files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from export.export_onnx import sha256_of


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def render(run: Path, model: Path, evaluation: dict, card_dir: Path, train_machine: str) -> str:
    history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    best = max(history, key=lambda h: max(h["val_acc"], h["val_acc_ema"]))
    minutes = history[-1]["elapsed_s"] / 60
    per_class = "\n".join(f"| {c} | {100 * a:.1f} % |" for c, a in evaluation["per_class"].items())
    top1 = 100 * evaluation["top1"]
    rel_model = os.path.relpath(model, card_dir)
    wd, ls = cfg.get("weight_decay", 5e-4), cfg.get("label_smoothing", 0.1)
    regularisation = f"weight decay {wd:g} on weights (not\n  biases); " + (
        f"label smoothing {ls:g}." if ls else "no label smoothing."
    )
    # The flags that differ from `cnnserve train`'s defaults, so the command reproduces this run.
    flags = "".join(
        f" --{name.replace('_', '-')} {cfg[name]:g}"
        for name, default in (("batch_size", 128), ("lr", 0.05), ("weight_decay", 5e-4), ("label_smoothing", 0.1))
        if name in cfg and cfg[name] != default
    )
    return f"""# cifar10 — model card

A CIFAR-10 classifier of the project's fixed architecture (conv 3→32, conv 32→32, max-pool,
FC 8192→512, FC 512→10; ReLU; dropout 0.3 and 0.5 in training only; 4,210,090 parameters),
exported to ONNX for cnnserve.

Validation top-1: **{top1:.2f} %** ({evaluation["images"]} held-out images)

| | |
|---|---|
| File | `{rel_model}` (ONNX opset 17, input `input` FP32 [N,3,32,32], output `logits` FP32 [N,10]) |
| sha256 | `{sha256_of(model)}` |
| Labels | {", ".join(evaluation["classes"])} (index order) |
| Preprocessing | RGB, /255, per-channel mean/std of the training split (stored in the ONNX metadata) |
| Training | {len(history)} epochs, {minutes:.0f} min on {train_machine} |
| Best epoch | {best["epoch"]} ({"EMA" if best["val_acc_ema"] >= best["val_acc"] else "raw"} weights) |

## Data

The 50,000 CIFAR-10 training images as JPEG (quality 75, re-encoded by a public mirror;
`../shared/data/cifar10/cifar10-train-jpeg.tar.gz`). A stratified 5,000-image validation split
(500 per class, seed 0) is held out; the model is trained on the other 45,000. The official test
split is not available here, so every figure is on the validation split; because the best epoch
is picked on it, the figure is slightly optimistic for unseen data.

## Recipe, and why

Chosen for a 2-conv-layer network without normalisation layers, trained on 2 CPU cores in under
an hour:

- **Augmentation**: random 32×32 crops of 4-pixel reflect-padded images and horizontal flips, done
  on whole batches in torch (no DataLoader workers fighting for 2 cores). The network's 4.2 M
  parameters sit almost all in the 8192→512 layer, which overfits without it.
- **Optimiser**: SGD, Nesterov momentum 0.9, batch {cfg.get("batch_size", 128)}, peak learning rate {cfg.get("lr", 0.05)}, warm-up over
  the first 15 % of steps then cosine decay to 0 ("one cycle"); {regularisation}
- **Weight averaging**: an exponential moving average of the weights (decay 0.999) is evaluated
  every epoch; it is consistently 1–4 points better than the raw weights mid-training and the
  checkpoint with the best validation accuracy (raw or EMA) is exported.

## Results on the validation split

| class | accuracy |
|---|---|
{per_class}

![confusion matrix](confusion_matrix.png)

![training curves](curves.png)

## Reproduce

```console
$ pip install -e '.[train]'
$ cnnserve train --data ../shared/data/cifar10/cifar10-train-jpeg.tar.gz --epochs {len(history)}{flags} --out-dir runs/cifar10
$ cnnserve export --checkpoint runs/cifar10/best.pt --output models/cifar10/1/model.onnx
$ cnnserve evaluate --model models/cifar10/1/model.onnx --out-dir models/cifar10
$ python -m export.model_card --run runs/cifar10 --model models/cifar10/1/model.onnx \\
      --evaluation models/cifar10/evaluation.json --notes models/cifar10/notes.md
```

Training is seeded (data split, initialisation, augmentation, shuffling); on another CPU or
torch build the figures can differ in the last decimal places. `cnnserve evaluate` needs no
torch: it runs the ONNX file through onnxruntime with the preprocessing from its metadata.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--model", type=Path, default=Path("models/cifar10/1/model.onnx"))
    parser.add_argument("--evaluation", type=Path, default=Path("models/cifar10/evaluation.json"))
    parser.add_argument("--machine", default=None, help="where training ran (default: this machine)")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the card (run-specific notes)")
    args = parser.parse_args()
    card_dir = args.model.parent.parent
    shutil.copyfile(args.run / "curves.png", card_dir / "curves.png")
    text = render(args.run, args.model, json.loads(args.evaluation.read_text()), card_dir, args.machine or machine())
    if args.notes:
        text += "\n" + args.notes.read_text()
    (card_dir / "README.md").write_text(text)
    print(f"wrote {card_dir / 'README.md'}")


if __name__ == "__main__":
    main()
