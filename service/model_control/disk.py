"""What a model's folder holds now: its version folders and a fingerprint of each.

Only folders named by a positive integer count as versions, so a deploy can write a new version
under any other name (``.3.tmp``, ``incoming-3``) and rename it into place when it is complete:
a rename within one filesystem is atomic, and the poller never sees it half-written. As a
second guard, poll mode loads a new or changed version only after its fingerprint (size,
modification time and inode of every file in it) read the same twice, ``settle`` seconds apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from service.inference.repository import MODEL_FILENAME, ModelSpec

#: (file name, size, mtime_ns, inode) of every file of a version folder, sorted.
Fingerprint = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class VersionOnDisk:
    spec: ModelSpec
    fingerprint: Fingerprint


def fingerprint(folder: Path) -> Fingerprint:
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return ()
    for entry in entries:
        try:
            st = entry.stat()
        except OSError:  # removed while we looked: the next look decides
            continue
        if entry.is_file():
            out.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def model_names(root: Path) -> list[str]:
    """Every model folder of the repository (hidden ones left out), sorted."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def versions_on_disk(model_dir: Path) -> dict[int, VersionOnDisk]:
    """The model's complete-looking versions: ``<n>/model.onnx`` present."""
    found: dict[int, VersionOnDisk] = {}
    try:
        children = list(model_dir.iterdir())
    except OSError:
        return found
    for child in children:
        if not (child.name.isdigit() and int(child.name) > 0 and child.is_dir()):
            continue
        model_file = child / MODEL_FILENAME
        if model_file.exists() and not model_file.is_dir():
            spec = ModelSpec(model_dir.name, str(int(child.name)), model_file)
            found[int(child.name)] = VersionOnDisk(spec, fingerprint(child))
    return found
