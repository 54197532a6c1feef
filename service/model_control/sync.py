"""``cnnserve sync-repository SOURCE TARGET``: publish model versions into a served repository the
way a poll-mode server needs them (README: Model control), for a deploy pipeline or a sidecar.

Each ``<model>/<version>/`` of SOURCE that TARGET lacks is copied into a hidden staging folder
beside its place (same filesystem), flushed to disk, then renamed to its number in one step: the
server never sees it half-written. A model's ``config.json`` is written to a temporary file and
renamed over the old one, after the versions it may name. Versions are immutable: a version
already in TARGET is never rewritten (publish a new number instead), and one whose files differ
from SOURCE is reported. ``--delete`` removes from TARGET the versions SOURCE no longer has
(renamed away first, so the server sees it leave in one step). ``--every N``: again every N
seconds, until stopped (a sidecar).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from service.model_control.policy import CONFIG_FILENAME


def _versions(model_dir: Path) -> list[Path]:
    return sorted(
        (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0),
        key=lambda p: int(p.name),
    )


def _models(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _flush(folder: Path) -> None:
    """Every file of ``folder`` and the folder itself on disk before the rename publishes them."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same_files(a: Path, b: Path) -> bool:
    def listing(folder: Path) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())

    return listing(a) == listing(b)


def sync_once(source: Path, target: Path, delete: bool = False) -> list[str]:
    """Publish SOURCE's new versions and configs into TARGET; what was done, one line each."""
    done = []
    target.mkdir(parents=True, exist_ok=True)
    for model in _models(source):
        into = target / model.name
        into.mkdir(exist_ok=True)
        for version in _versions(model):
            place = into / version.name
            if place.exists():
                if not _same_files(version, place):
                    done.append(f"{model.name}/{version.name}: differs from {place} and was left alone "
                                "(versions are immutable: publish a new number)")  # fmt: skip
                continue
            staging = into / f".{version.name}.sync-tmp"
            shutil.rmtree(staging, ignore_errors=True)  # a copy interrupted earlier
            shutil.copytree(version, staging)
            _flush(staging)
            os.rename(staging, place)
            done.append(f"{model.name}/{version.name}: published")
        config = model / CONFIG_FILENAME
        if config.is_file() and (
            not (into / CONFIG_FILENAME).is_file() or (into / CONFIG_FILENAME).read_bytes() != config.read_bytes()
        ):
            staging_file = into / f".{CONFIG_FILENAME}.sync-tmp"
            shutil.copyfile(config, staging_file)
            os.replace(staging_file, into / CONFIG_FILENAME)
            done.append(f"{model.name}/{CONFIG_FILENAME}: published")
        if delete:
            wanted = {v.name for v in _versions(model)}
            for old in _versions(into):
                if old.name not in wanted:
                    leaving = into / f".{old.name}.deleting"
                    os.rename(old, leaving)
                    shutil.rmtree(leaving)
                    done.append(f"{model.name}/{old.name}: removed")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cnnserve sync-repository", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, help="repository to publish from (<model>/<version>/model.onnx)")
    parser.add_argument("target", type=Path, help="the repository a server polls")
    parser.add_argument("--every", type=float, default=0, help="repeat every N seconds (0: once)")
    parser.add_argument("--delete", action="store_true", help="remove versions the source no longer has")


def run(args: argparse.Namespace) -> int:
    if not args.source.is_dir():
        print(f"cnnserve sync-repository: source {args.source.absolute()} is not a folder", flush=True)
        return 1
    while True:
        for line in sync_once(args.source, args.target, args.delete):
            print(line, flush=True)
        if args.every <= 0:
            return 0
        time.sleep(args.every)
