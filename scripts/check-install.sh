#!/usr/bin/env bash
# Does `pip install cnnserve` (and the lean CPU-only install, requirements-cpu.txt) resolve where the
# README says it does? pip resolves the requirements from the package index for other Pythons and
# platforms without their interpreters (--dry-run --python-version --platform, wheels only), so one
# Linux machine checks them all.
#
#   scripts/check-install.sh          # Python 3.10-3.14: Linux x86-64 (plain, lean CPU), Linux aarch64, macOS arm64;
#                                     # then the source against Python 3.10's grammar
#   scripts/check-install.sh lock     # print requirements.lock: the runtime set at the versions of this venv
#   scripts/check-install.sh cpu      # print requirements-cpu.txt: pyproject's requirements with `onnxruntime`
#
# pip evaluates environment markers against the interpreter running it, not the --python-version and
# --platform asked for, so this script evaluates pyproject's own markers for each target itself
# (packaging, as pip does) and hands pip the requirements that apply there. Markers inside the
# dependencies' own metadata are still evaluated for this machine: a transitive dependency that
# only another Python or platform needs is not checked.
#
# Needs network access to the package index; it installs nothing. No interpreter of the other
# versions is needed; the source check parses every module with Python 3.10's grammar (ast
# feature_version) and mypy (python_version = "3.10" in pyproject.toml, run by CI) checks the
# standard library names used against 3.10's.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The requirements of FILE (pyproject.toml: its dependencies; or a requirements file) that apply on
# Python VERSION and PLATFORM (linux-x86_64, linux-aarch64, macos-arm64), markers dropped.
requirements_for() {  # requirements_for FILE VERSION PLATFORM
    "$PY" - "$@" <<'PYEOF'
import sys, tomllib
from packaging.requirements import Requirement

source, version, platform = sys.argv[1:]
if source.endswith(".toml"):
    lines = tomllib.load(open(source, "rb"))["project"]["dependencies"]
else:
    lines = [ln.split("#", 1)[0].strip() for ln in open(source)]
system, machine = platform.split("-")
env = {
    "python_version": version,
    "python_full_version": f"{version}.0",
    "sys_platform": {"linux": "linux", "macos": "darwin"}[system],
    "platform_system": {"linux": "Linux", "macos": "Darwin"}[system],
    "platform_machine": machine,
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
for line in filter(None, lines):
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate(env):
        req.marker = None
        print(req)
PYEOF
}

linux_x86=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
linux_arm=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64)
mac_arm=(macosx_14_0_arm64 macosx_13_0_arm64 macosx_12_0_arm64 macosx_11_0_arm64 macosx_11_0_universal2 macosx_10_9_universal2)

resolve() {  # resolve FILE PYTHON_VERSION PLATFORM REPORT: pip's dry run for that Python and platform
    local file=$1 version=$2 where=$3 report=$4 platforms
    case $where in
        linux-x86_64) platforms=("${linux_x86[@]}") ;;
        linux-aarch64) platforms=("${linux_arm[@]}") ;;
        macos-arm64) platforms=("${mac_arm[@]}") ;;
    esac
    requirements_for "$file" "$version" "$where" > "$work/req.txt" || return 1
    "$PY" -m pip install -q --dry-run --ignore-installed --target "$work/t" --only-binary=:all: \
        --python-version "$version" "${platforms[@]/#/--platform=}" --report "$report" -r "$work/req.txt" \
        2>&1 | grep -v "is ignored\|Location"
    return "${PIPESTATUS[0]}"
}

case "${1:-}" in
lock)
    # This venv's versions of everything the CPU image needs (onnxruntime at onnxruntime-gpu's version
    # where the venv has the GPU flavour), resolved for the image's Linux x86-64 and Python 3.11.
    "$PY" -m pip freeze --exclude-editable | sed 's/^onnxruntime-gpu==/onnxruntime==/' > "$work/constraints.txt"
    "$PY" scripts/runtime-requirements.py pyproject.toml --ort-package onnxruntime > "$work/cpu.txt" || exit 1
    PIP_CONSTRAINT="$work/constraints.txt" resolve "$work/cpu.txt" 3.11 linux-x86_64 "$work/lock.json" >&2 || exit 1
    cat <<'EOF'
# The container image's exact runtime dependencies (transitive ones included): the versions the
# test suite runs with. pyproject.toml gives the library's ranges; this file pins what the
# Dockerfile installs, so an image built later is the image tested. The ONNX Runtime line is
# swapped to the image's flavour (onnxruntime-gpu, same version) by scripts/runtime-requirements.py.
# Regenerate after changing a pin (the same set resolves on Python 3.11, the CPU image, and 3.12,
# the GPU image): scripts/check-install.sh lock > requirements.lock
EOF
    "$PY" -c 'import json, sys
names = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"])
print("\n".join(f"{n}=={v}" for n, v in names))' "$work/lock.json"
    exit 0
    ;;
cpu)
    cat <<'EOF'
# The runtime requirements with the CPU-only ONNX Runtime (`onnxruntime`, ~20 MB) on every platform:
# the lean install for a Linux x86-64 machine without an NVIDIA GPU, where a plain `pip install -e .`
# brings `onnxruntime-gpu` (~340 MB). Install these, then the project without its dependencies:
#     pip install -r requirements-cpu.txt && pip install --no-deps -e .
# Regenerate after changing pyproject.toml's dependencies (tests/test_deploy.py checks it is current):
#     scripts/check-install.sh cpu > requirements-cpu.txt
EOF
    exec "$PY" scripts/runtime-requirements.py pyproject.toml --ort-package onnxruntime
    ;;
esac

failed=()
for version in 3.10 3.11 3.12 3.13 3.14; do
    for case in "linux-x86_64 pyproject.toml" "linux-x86_64 requirements-cpu.txt" "linux-aarch64 pyproject.toml" \
        "macos-arm64 pyproject.toml"; do
        read -r where file <<<"$case"
        what=$([ "$file" = pyproject.toml ] && echo "pip install ." || echo "lean CPU ($file)")
        if resolve "$file" "$version" "$where" "$work/r.json" >"$work/out" 2>&1; then
            ort=$("$PY" -c 'import json, sys
print(" ".join(m["name"] + " " + m["version"] for m in (i["metadata"] for i in json.load(open(sys.argv[1]))["install"]) if m["name"].lower().startswith("onnxruntime")))' "$work/r.json")
            echo "ok      Python $version $where, $what: $ort"
        else
            echo "FAILED  Python $version $where, $what: $(grep -m1 ERROR "$work/out")"
            failed+=("$version/$where/$file")
        fi
    done
done
# The source against Python 3.10's grammar (the oldest supported): a newer construct (except*, a
# generic class's type parameters, `type` statements) fails here although this interpreter runs it.
if "$PY" - <<'PYEOF'
import ast, pathlib, sys
bad = []
for path in sorted(p for d in ("service", "export", "loadtest") for p in pathlib.Path(d).rglob("*.py")):
    try:
        ast.parse(path.read_text(), str(path), feature_version=(3, 10))
    except SyntaxError as e:
        bad.append(f"{path}:{e.lineno}: {e.msg}")
print("\n".join(bad) or "ok      every module of service, export and loadtest parses as Python 3.10")
sys.exit(1 if bad else 0)
PYEOF
then :; else failed+=("python3.10-grammar"); fi
((${#failed[@]} == 0)) || { echo "check-install: ${#failed[@]} failed: ${failed[*]}"; exit 1; }
echo "check-install: every case resolves"
