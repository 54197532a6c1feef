#!/usr/bin/env python3
"""Print the runtime requirements of pyproject.toml ([project].dependencies), one per line.

Used by the Dockerfile to install the dependencies in a layer of their own (rebuilt only when
pyproject.toml changes, not on every source edit) and to pick the ONNX Runtime flavour:

    runtime-requirements.py pyproject.toml --ort-package onnxruntime      # CPU image
    runtime-requirements.py pyproject.toml --ort-package onnxruntime-gpu  # GPU image (as declared)
    runtime-requirements.py pyproject.toml --extras "tracing"             # plus optional extras

The ONNX Runtime requirement (onnxruntime or onnxruntime-gpu, whichever pyproject names) is
rewritten to the chosen package, keeping its version specifier, extras-free, and its marker.
Only the standard library is used: it runs on the bare base images.
"""

from __future__ import annotations

import argparse
import re
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", help="path to pyproject.toml")
    parser.add_argument(
        "--ort-package",
        default="onnxruntime-gpu",
        choices=sorted(ORT_NAMES),
        help="ONNX Runtime distribution to install (default: %(default)s)",
    )
    parser.add_argument("--extras", default="", help="optional extras whose requirements to add (space-separated)")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        data = tomllib.load(f)
    for line in runtime_requirements(data, args.ort_package, args.extras.split()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
