#!/usr/bin/env bash
# Does `pip install cnnserve[cpu]` (and [gpu]) resolve where the README says it does? pip resolves
# pyproject.toml's dependencies from PyPI for other Pythons and platforms without their interpreters
# (--dry-run --python-version --platform, wheels only), so one Linux machine checks them all.
#
#   scripts/check-install.sh          # Python 3.11-3.14: Linux x86-64 and aarch64 ([cpu], [gpu]), macOS arm64 ([cpu])
#   scripts/check-install.sh lock     # print requirements.lock: the runtime set at the versions of this venv
#
# Needs network access to the package index; it installs nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The runtime requirements and an extra's, as a requirements file (the project itself needs no build).
requirements() {  # requirements EXTRA
    "$PY" - "$1" <<'PYEOF'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"][sys.argv[1]]))
PYEOF
}

linux_x86=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
linux_arm=(manylinux_2_28_aarch64 manylinux_2_27_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64)
mac_arm=(macosx_14_0_arm64 macosx_13_0_arm64 macosx_12_0_arm64 macosx_11_0_arm64 macosx_11_0_universal2 macosx_10_9_universal2)

resolve() {  # resolve PYTHON_VERSION EXTRA REPORT PLATFORM...
    local version=$1 extra=$2 report=$3
    shift 3
    requirements "$extra" > "$work/req-$extra.txt"
    "$PY" -m pip install -q --dry-run --ignore-installed --target "$work/t" --only-binary=:all: \
        --python-version "$version" "${@/#/--platform=}" --report "$report" -r "$work/req-$extra.txt" \
        2>&1 | grep -v "is ignored\|Location"
    return "${PIPESTATUS[0]}"
}

if [ "${1:-}" = lock ]; then
    # This venv's versions of everything the CPU image needs (onnxruntime at onnxruntime-gpu's version
    # where the venv has the GPU flavour), resolved for the image's Linux x86-64 and Python 3.11.
    "$PY" -m pip freeze --exclude-editable | sed 's/^onnxruntime-gpu==/onnxruntime==/' > "$work/constraints.txt"
    PIP_CONSTRAINT="$work/constraints.txt" resolve 3.11 cpu "$work/lock.json" "${linux_x86[@]}" >&2 || exit 1
    sed -n '1,6p' requirements.lock
    "$PY" -c 'import json, sys
names = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"]) for i in json.load(open(sys.argv[1]))["install"])
print("\n".join(f"{n}=={v}" for n, v in names))' "$work/lock.json"
    exit 0
fi

failed=()
for version in 3.11 3.12 3.13 3.14; do
    for case in "linux-x86_64 cpu" "linux-x86_64 gpu" "linux-aarch64 cpu" "macos-arm64 cpu"; do
        read -r where extra <<<"$case"
        case $where in
            linux-x86_64) platforms=("${linux_x86[@]}") ;;
            linux-aarch64) platforms=("${linux_arm[@]}") ;;
            macos-arm64) platforms=("${mac_arm[@]}") ;;
        esac
        if resolve "$version" "$extra" "$work/r.json" "${platforms[@]}" >"$work/out" 2>&1; then
            echo "ok      Python $version $where [$extra]"
        else
            echo "FAILED  Python $version $where [$extra]: $(grep -m1 ERROR "$work/out")"
            failed+=("$version/$where/$extra")
        fi
    done
done
((${#failed[@]} == 0)) || { echo "check-install: ${#failed[@]} failed: ${failed[*]}"; exit 1; }
echo "check-install: every case resolves"
