"""Train the seed CNN on CIFAR-10 (CPU-friendly recipe, see models/cifar10/README.md).

Recipe, and why, for a 2-conv-layer net with no normalisation layers on 2 CPU cores:
- augmentation done on whole batches in torch (no DataLoader workers competing for 2 cores):
  random crop with 4-pixel reflect padding and horizontal flip — the two that always pay off on
  CIFAR-10;
- SGD with Nesterov momentum and a one-cycle learning rate (warm-up to ``lr`` then cosine to
  ~0), weight decay on weights only, label smoothing 0.1;
- an exponential moving average (EMA) of the weights, evaluated every epoch; the exported
  weights are the EMA's when it scores better on validation, which it usually does for a
  network this small.
Every epoch writes ``metrics.jsonl``, ``curves.png`` and a resumable ``last.pt`` checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from export.data import Dataset, channel_stats, load_split
from export.model import Cifar10CNN
from service.inference.preprocess import Preprocessing, normalize


@dataclass
class TrainConfig:
    data: str
    out_dir: str = "runs/cifar10"
    epochs: int = 65
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.15
    ema_decay: float = 0.999
    val_size: int = 5000
    split_seed: int = 0
    seed: int = 0
    threads: int = 0  # 0: torch's default (all cores)
    limit_train: int = 0  # >0: train on the first N training images only (smoke runs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def to_normalized_nchw(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 NHWC images → the normalised float32 NCHW tensor, with the server's own function."""
    return torch.from_numpy(normalize(images, Preprocessing(mean=tuple(mean), std=tuple(std))))


class BatchAugmenter:
    """Random 32x32 crops of the 4-pixel reflect-padded images, then random horizontal flips,
    for a whole batch at once (gather with precomputed index grids: no per-image Python)."""

    def __init__(self, padded: torch.Tensor, pad: int = 4) -> None:
        self.padded = padded  # [N, 3, 32+2p, 32+2p]
        self.pad = pad
        self.base = torch.arange(32)

    def batch(self, index: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(index)
        oy = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * self.pad + 1, (n,), generator=gen)
        rows = (oy[:, None] + self.base)[:, None, :, None]
        cols = (ox[:, None] + self.base)[:, None, None, :]
        flip = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
        chans = torch.arange(3)[None, :, None, None]
        return self.padded[index[:, None, None, None], chans, rows, cols]


def one_cycle_lr(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    warm = max(1, int(total * warmup_fraction))
    if step < warm:
        return peak * (0.1 + 0.9 * step / warm)
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch])
        loss_sum += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
    return loss_sum / len(y), correct / len(y)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.plot(epochs, [h["val_loss_ema"] for h in history], label="val (EMA)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [100 * h["train_acc"] for h in history], label="train (augmented)")
    ax2.plot(epochs, [100 * h["val_acc"] for h in history], label="val")
    ax2.plot(epochs, [100 * h["val_acc_ema"] for h in history], label="val (EMA)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 %")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle("cnnserve CIFAR-10 training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train(cfg: TrainConfig, resume: bool = True) -> Path:
    """Train; returns the path of ``best.pt`` (weights, normalisation, classes, metrics)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)

    train_ds: Dataset = load_split(cfg.data, "train", cfg.val_size, cfg.split_seed)
    val_ds: Dataset = load_split(cfg.data, "val", cfg.val_size, cfg.split_seed)
    if cfg.limit_train:
        keep = np.random.default_rng(cfg.seed).permutation(len(train_ds))[: cfg.limit_train]
        train_ds = train_ds.subset(np.sort(keep))
    mean, std = channel_stats(train_ds.images)
    x_train = to_normalized_nchw(train_ds.images, mean, std)
    y_train = torch.from_numpy(train_ds.labels)
    x_val = to_normalized_nchw(val_ds.images, mean, std)
    y_val = torch.from_numpy(val_ds.labels)
    augmenter = BatchAugmenter(F.pad(x_train, (4, 4, 4, 4), mode="reflect"))

    model = Cifar10CNN()
    ema = copy.deepcopy(model)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") else decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch

    history: list[dict] = []
    start_epoch, best_acc, elapsed_before = 0, -1.0, 0.0
    ckpt_path = out / "last.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if ckpt["config"] != asdict(cfg):
            raise SystemExit(f"{ckpt_path} was written with another configuration; use a new --out-dir")
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, best_acc, history = ckpt["epoch"], ckpt["best_acc"], ckpt["history"]
        elapsed_before = history[-1]["elapsed_s"] if history else 0.0
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = one_cycle_lr(step, total_steps, cfg.lr, cfg.warmup_fraction)
            index = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb, yb = augmenter.batch(index, gen), y_train[index]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                # Warm the EMA up so early epochs' averages are not dominated by the random init.
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(d).add_(pm, alpha=1 - d)
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{100 * correct / seen:.1f}%",
                lr=f"{optimizer.param_groups[0]['lr']:.4f}",
                refresh=False,
            )
        bar.close()
        val_loss, val_acc = evaluate_torch(model, x_val, y_val)
        val_loss_ema, val_acc_ema = evaluate_torch(ema, x_val, y_val)
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "val_loss_ema": val_loss_ema,
            "val_acc_ema": val_acc_ema,
            "lr": optimizer.param_groups[0]["lr"],
            "elapsed_s": elapsed_before + time.perf_counter() - t0,
        }
        history.append(record)
        print(
            f"epoch {epoch + 1}: train {100 * record['train_acc']:.2f}% val {100 * val_acc:.2f}% "
            f"val(EMA) {100 * val_acc_ema:.2f}% elapsed {record['elapsed_s']:.0f}s",
            flush=True,
        )
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for acc, net, which in ((val_acc, model, "raw"), (val_acc_ema, ema, "ema")):
            if acc > best_acc:
                best_acc = acc
                torch.save(
                    {
                        "model": net.state_dict(),
                        "weights": which,
                        "epoch": epoch + 1,
                        "val_acc": acc,
                        "mean": mean,
                        "std": std,
                        "classes": list(train_ds.classes),
                        "config": asdict(cfg),
                    },
                    out / "best.pt",
                )
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "best_acc": best_acc,
                "history": history,
                "config": asdict(cfg),
            },
            ckpt_path.with_suffix(".tmp"),
        )
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)
        plot_curves(history, out / "curves.png")
    return out / "best.pt"
