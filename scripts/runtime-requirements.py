#!/usr/bin/env python3
"""Print runtime requirements, one per line, with the ONNX Runtime flavour chosen: from the image's
lock file (the Dockerfile's use) or from pyproject.toml ([project].dependencies, the library's
ranges), plus the optional extras asked for (from pyproject.toml).

Used by the Dockerfile to install the dependencies in a layer of their own (rebuilt only when the
lock changes, not on every source edit) and to pick the ONNX Runtime flavour, and to write
requirements-cpu.txt, the lean CPU-only install of README "Install":

    runtime-requirements.py requirements.lock --ort-package onnxruntime      # CPU image
    runtime-requirements.py requirements.lock --ort-package onnxruntime-gpu  # GPU image
    runtime-requirements.py requirements.lock --extras "tracing"             # plus optional extras
    runtime-requirements.py pyproject.toml --ort-package onnxruntime > requirements-cpu.txt

The ONNX Runtime requirement (onnxruntime or onnxruntime-gpu, whichever the file names) is
rewritten to the chosen package, keeping its version specifier, extras-free, and its marker.
Extras are pinned in pyproject.toml (the lock holds the runtime's own packages). Only the standard
library is used: it runs on the bare base images.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ORT_NAMES = {"onnxruntime", "onnxruntime-gpu"}
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(pyproject: dict, ort_package: str, extras: list[str] | None = None) -> list[str]:
    project = pyproject.get("project", {})
    if "dependencies" in project.get("dynamic", []):
        raise SystemExit("pyproject.toml declares dependencies as dynamic; list them in [project].dependencies")
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras or [] if e not in optional]
    if unknown:
        raise SystemExit(f"pyproject.toml has no extra {unknown[0]!r} (it has {', '.join(sorted(optional))})")
    out = []
    for req in [*project.get("dependencies", []), *(r for e in extras or [] for r in optional[e])]:
        m = _REQ.match(req)
        if not m:
            raise SystemExit(f"cannot parse requirement {req!r}")
        name, _extras, rest = m.groups()
        if normalize(name) in ORT_NAMES:
            req = f"{ort_package}{rest}".strip()
        out.append(req.strip())
    return out


def lock_requirements(text: str, ort_package: str) -> list[str]:
    """The lines of a requirements lock file (comments and blank lines dropped), ORT swapped."""
    lines = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return runtime_requirements({"project": {"dependencies": [line for line in lines if line]}}, ort_package)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="requirements.lock, or pyproject.toml (its dependencies)")
    parser.add_argument(
        "--ort-package",
        default="onnxruntime-gpu",
        choices=sorted(ORT_NAMES),
        help="ONNX Runtime distribution to install (default: %(default)s)",
    )
    parser.add_argument("--extras", default="", help="optional extras whose requirements to add (space-separated)")
    parser.add_argument("--pyproject", help="where the extras are declared (default: pyproject.toml beside the source)")
    args = parser.parse_args(argv)
    pyproject_path = Path(args.pyproject or Path(args.source).with_name("pyproject.toml"))
    extras = args.extras.split()
    if args.source.endswith(".toml"):
        with open(args.source, "rb") as f:
            lines = runtime_requirements(tomllib.load(f), args.ort_package, extras)
    else:
        with open(args.source) as f:
            lines = lock_requirements(f.read(), args.ort_package)
        if extras:
            with open(pyproject_path, "rb") as f:
                data = tomllib.load(f)
            lines += runtime_requirements(
                {"project": {**data.get("project", {}), "dependencies": []}}, args.ort_package, extras
            )
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
