"""The page's ten sample images, one per class, read from the CIFAR-10 data when it is present.

CIFAR-10 images are not committed (the data's terms are not ours to relicense), so the server
takes them at run time from ``samples_data`` (the training archive the model was trained from):
the first image of each class in the held-out validation split that ``export.data`` defines
(5,000 images, stratified, seed 0), i.e. images the model never trained on. Without the data the
page simply offers no samples.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("cnnserve.samples")

SOURCE = (
    "CIFAR-10 (Krizhevsky, 2009), training archive; the first image of each class in cnnserve's "
    "held-out validation split (not used for training)"
)


@dataclass(frozen=True)
class Sample:
    label: str
    class_index: int
    png: bytes


def load_samples(path: str | Path) -> list[Sample]:
    """One held-out validation image per class, as PNG (raises when the data cannot be read)."""
    from export.data import load_split

    ds = load_split(path, "val")
    out = []
    for c, label in enumerate(ds.classes):
        i = int(np.flatnonzero(ds.labels == c)[0])
        buf = io.BytesIO()
        Image.fromarray(ds.images[i]).save(buf, format="PNG")
        out.append(Sample(label, c, buf.getvalue()))
    return out


def load_samples_once(path: str | Path) -> list[Sample]:
    """``load_samples`` through a small cache file shared by every process on the machine: the
    first caller decodes the archive (seconds, and a few hundred MB while it does), the others
    wait on a file lock and read ten PNGs; a restarted front end reads them at once."""
    import fcntl
    import hashlib

    from export.data import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}|samples".encode()).hexdigest()[:16]
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / f"samples-{key}.npz"
    with open(folder / f"samples-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if cached.exists():
            with np.load(cached) as z:
                pngs = np.split(z["png"], z["ends"][:-1])
                return [Sample(str(label), int(c), png.tobytes())
                        for label, c, png in zip(z["labels"], z["classes"], pngs)]  # fmt: skip
        samples = load_samples(path)
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, labels=np.array([x.label for x in samples]), classes=np.array([x.class_index for x in samples]),
                 png=np.frombuffer(b"".join(x.png for x in samples), np.uint8),
                 ends=np.cumsum([len(x.png) for x in samples]))  # fmt: skip
        tmp.replace(cached)
        return samples


class Samples:
    """Loaded on first use, in a worker thread (decoding the archive the first time takes seconds;
    ``load_samples_once`` does it once per machine)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._samples: list[Sample] | None = None
        self._lock: asyncio.Lock | None = None

    async def get(self) -> list[Sample]:
        if self._samples is not None:
            return self._samples
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._samples is None:
                if not self.path.is_file() and not self.path.is_dir():
                    # Said once (the answer is cached): otherwise the page's samples vanish silently.
                    log.info(
                        "no sample images for the page: %s not found (--samples-data / CNNSERVE_SAMPLES_DATA)",
                        self.path.absolute(),
                    )
                    self._samples = []
                else:
                    try:
                        self._samples = await asyncio.to_thread(load_samples_once, self.path)
                    except Exception as e:  # a damaged archive must not break the page
                        log.warning("cannot read sample images from %s: %s", self.path, e)
                        self._samples = []
        return self._samples
