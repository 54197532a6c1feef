"""CIFAR-10 data: image-folder trees (or a .tar.gz of one) and CIFAR-10's canonical python archive.

numpy + Pillow only (no torch), so that ``cnnserve evaluate`` runs in the serving install.
Every loader returns ``Dataset(images uint8 [N,32,32,3] RGB, labels int64 [N], classes)``.
Decoded data sets are cached as ``.npz`` (keyed by the source's path, size and mtime) because
decoding 50,000 JPEGs takes ~15 s and is repeated by every train/evaluate run.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
from PIL import Image

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_PYTHON_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_PYTHON_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_VAL_SIZE = 5000
DEFAULT_SPLIT_SEED = 0


@dataclass(frozen=True)
class Dataset:
    images: np.ndarray  # uint8 [N, 32, 32, 3], RGB
    labels: np.ndarray  # int64 [N]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.images[index], self.labels[index], self.classes)


def cache_dir() -> Path:
    return Path(os.environ.get("CNNSERVE_CACHE_DIR", Path.home() / ".cache" / "cnnserve"))


def _decode_rgb32(data: bytes, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        if rgb.size != (32, 32):
            raise ValueError(f"{name}: expected a 32x32 image, got {rgb.size[0]}x{rgb.size[1]}")
        return np.asarray(rgb, dtype=np.uint8)


def _split_class_of(parts: tuple[str, ...], split: str) -> str | None:
    """Class name for a member path ``[prefix/]<split>/<class>/<file>`` or ``<class>/<file>``."""
    if len(parts) >= 3 and parts[-3] == split:
        return parts[-2]
    if len(parts) == 2:
        return parts[0]
    return None


def _build_dataset(items: list[tuple[str, str, bytes]], source: str) -> Dataset:
    """items: (class name, member name, encoded bytes)."""
    if not items:
        raise ValueError(f"{source}: no images found")
    classes = tuple(sorted({c for c, _, _ in items}))
    if set(classes) <= set(CIFAR10_CLASSES) and len(classes) == len(CIFAR10_CLASSES):
        classes = CIFAR10_CLASSES
    index = {c: i for i, c in enumerate(classes)}
    items.sort(key=lambda it: (index[it[0]], it[1]))
    images = np.stack([_decode_rgb32(data, name) for _, name, data in items])
    labels = np.array([index[c] for c, _, _ in items], dtype=np.int64)
    return Dataset(images, labels, classes)


def load_image_folder(path: str | Path, split: str = "train") -> Dataset:
    """Images laid out as ``<split>/<class>/*.jpg|png`` (or ``<class>/*``), in a folder or a .tar.gz."""
    path = Path(path)
    items: list[tuple[str, str, bytes]] = []
    if path.is_dir():
        root = path / split if (path / split).is_dir() else path
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    items.append((class_dir.name, str(f), f.read_bytes()))
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                cls = _split_class_of(Path(member.name).parts, split)
                if cls is None:
                    continue
                # extractfile() is None only for members that are not regular files (isfile() above)
                items.append((cls, member.name, cast(IO[bytes], tar.extractfile(member)).read()))
    return _build_dataset(items, str(path))


def _unpickle(data: bytes) -> dict:
    return pickle.loads(data, encoding="bytes")


def load_cifar_python(path: str | Path, split: str = "train") -> Dataset:
    """CIFAR-10's python archive (``cifar-10-python.tar.gz``) or its extracted ``cifar-10-batches-py``.

    split "train" is data_batch_1..5, "test" is test_batch.
    """
    path = Path(path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        for name in [*names, "batches.meta"]:
            blobs[name] = (path / name).read_bytes()
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = Path(member.name).name
                if member.isfile() and base in (*names, "batches.meta"):
                    blobs[base] = cast(IO[bytes], tar.extractfile(member)).read()  # isfile(): never None
    missing = [n for n in names if n not in blobs]
    if missing:
        raise ValueError(f"{path}: not a CIFAR-10 python archive (missing {', '.join(missing)})")
    meta = _unpickle(blobs["batches.meta"]) if "batches.meta" in blobs else {}
    classes = tuple(c.decode() for c in meta.get(b"label_names", [])) or CIFAR10_CLASSES
    images, labels = [], []
    for name in names:
        batch = _unpickle(blobs[name])
        # Rows are 3072 bytes: the R plane, then G, then B, each 32x32 row-major.
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return Dataset(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar_python(
    dest_dir: str | Path, url: str = CIFAR10_PYTHON_URL, md5: str = CIFAR10_PYTHON_MD5, timeout: float = 60.0
) -> Path:
    """Download CIFAR-10's python archive into ``dest_dir`` and verify its MD5 (the checksum the
    data set's home page publishes). An existing file with the right checksum is reused; a file
    with the wrong one is deleted and the call fails."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if target.exists() and _md5(target) == md5:
        return target
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    actual = _md5(partial)
    if actual != md5:
        partial.unlink()
        raise ValueError(f"checksum mismatch for {url}: md5 {actual}, expected {md5}")
    partial.replace(target)
    return target


def detect_format(path: Path) -> str:
    """ "cifar-python" or "image-folder"."""
    if path.is_dir():
        return "cifar-python" if (path / "data_batch_1").exists() or (path / "test_batch").exists() else "image-folder"
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            base = Path(member.name).name
            if base.startswith(("data_batch_", "test_batch")):
                return "cifar-python"
            if base.lower().endswith(IMAGE_SUFFIXES):
                return "image-folder"
    raise ValueError(f"{path}: neither an image folder nor a CIFAR-10 python archive")


def load_dataset(path: str | Path, split: str = "train", use_cache: bool = True) -> Dataset:
    """Load either format (detected), through the .npz cache."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{split}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"dataset-{key}.npz"
    if use_cache and cached.exists():
        with np.load(cached) as z:
            return Dataset(z["images"], z["labels"], tuple(str(c) for c in z["classes"]))
    fmt = detect_format(path)
    ds = load_cifar_python(path, split) if fmt == "cifar-python" else load_image_folder(path, split)
    if use_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Several processes (a server's front ends) may fill the cache at once: each writes its
        # own temporary file, and the last rename wins with the same content.
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}-{threading.get_ident()}.tmp.npz")
        np.savez(tmp, images=ds.images, labels=ds.labels, classes=np.array(ds.classes))
        tmp.replace(cached)
    return ds


def stratified_split(
    labels: np.ndarray, val_size: int = DEFAULT_VAL_SIZE, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """(train index, val index): ``val_size`` images, the same share of every class, fixed seed."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = val_size / len(labels)
    val = []
    for c, n in zip(classes, counts):
        members = np.flatnonzero(labels == c)
        val.append(rng.permutation(members)[: round(n * share)])
    val_index = np.sort(np.concatenate(val))
    train_index = np.setdiff1d(np.arange(len(labels)), val_index)
    return train_index, val_index


def load_split(
    path: str | Path, which: str, val_size: int = DEFAULT_VAL_SIZE, seed: int = DEFAULT_SPLIT_SEED
) -> Dataset:
    """which: "train" (minus the held-out images), "val" (the held-out images), "all" or "test"
    (CIFAR-10 python archive's test batch)."""
    if which == "test":
        return load_dataset(path, "test")
    ds = load_dataset(path, "train")
    if which == "all":
        return ds
    train_index, val_index = stratified_split(ds.labels, val_size, seed)
    return ds.subset(train_index if which == "train" else val_index)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 RGB images, on the [0,1] scale."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).round(4).tolist(), x.std(0).round(4).tolist()
