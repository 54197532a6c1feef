#!/usr/bin/env bash
# Container smoke test: build the CPU image, run it the way Kubernetes does (read-only root,
# writable /tmp, no capabilities, non-root), wait for /readyz, POST a PNG to /predict, expect a
# 200 JSON with "results", check /metrics counted it, then stop it with SIGTERM and expect a
# clean exit within the grace period.
#
#   scripts/container-smoke.sh
#
# Environment (all optional):
#   CONTAINER_ENGINE   docker or podman (default: docker if its daemon answers, else podman)
#   IMAGE              tag to build/run (default: cnnserve:smoke-cpu)
#   SKIP_BUILD=1       run an already built IMAGE
#   BUILD_ARGS         extra build arguments, e.g. "--build-arg PYTHON_IMAGE=my-mirror/python:3.11-slim"
#   HOST_PORT          host port mapped to the container's 8000 (default: 18000, on 127.0.0.1)
#   READY_TIMEOUT      seconds to wait for /readyz (default: 180)
#   SMOKE_UPLOAD       how to send the PNG: auto (default: multipart field "file", then the raw
#                      body as image/png), multipart:FIELD, raw
# Needs: curl and python3 on the host.
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-cnnserve:smoke-cpu}
HOST_PORT=${HOST_PORT:-18000}
READY_TIMEOUT=${READY_TIMEOUT:-180}
SMOKE_UPLOAD=${SMOKE_UPLOAD:-auto}
NAME=cnnserve-smoke-$$
BASE=http://127.0.0.1:${HOST_PORT}
WORK=$(mktemp -d)

log() { printf '[smoke] %s\n' "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# --- engine ------------------------------------------------------------------------------------
ENGINE=()
BUILD_FLAGS=()
RUN_FLAGS=()
DOCKERFILE=Dockerfile
STARTED=0
pick_engine() {
    local want=${CONTAINER_ENGINE:-}
    if [[ -z $want ]]; then
        if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
            want=docker
        elif command -v podman >/dev/null 2>&1; then
            want=podman
        else
            die "neither a working docker (daemon reachable) nor podman found"
        fi
    fi
    case $want in
        docker) ENGINE=(docker) ;;
        podman)
            ENGINE=(podman)
            # runc: crun is not always usable in nested/VM setups; docker format keeps HEALTHCHECK.
            if command -v runc >/dev/null 2>&1; then ENGINE+=(--runtime runc); fi
            BUILD_FLAGS+=(--format docker)
            # Buildah before 1.29 takes `FROM ${FLAVOUR}-base` for an image name ("short-name did
            # not resolve") instead of the stage of that name: build from a copy with the CPU
            # flavour's stage named outright.
            sed 's/\${FLAVOUR}-base/cpu-base/g' Dockerfile > "$WORK/Dockerfile"
            DOCKERFILE=$WORK/Dockerfile
            # Podman asks the runtime for its own default limits (nofile 1048576), which fail past
            # this host's hard limits ("error setting rlimit type 7"): this shell's own instead,
            # nproc at most 32768 (runc here refused 65536 even under a hard limit of 96362).
            local nofile nproc
            nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
            [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
            [[ $nofile == unlimited ]] && nofile=65536
            RUN_FLAGS+=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")
            ;;
        *) die "unknown CONTAINER_ENGINE=$want" ;;
    esac
    log "engine: ${ENGINE[*]}"
}

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]] && [[ $STARTED == 1 ]]; then
        log "container logs:"
        "${ENGINE[@]}" logs "$NAME" 2>&1 | tail -n 80 >&2 || true
    fi
    if [[ ${#ENGINE[@]} -gt 0 ]]; then
        "${ENGINE[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT

pick_engine

# --- build -------------------------------------------------------------------------------------
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "building $IMAGE (CPU flavour)"
    # shellcheck disable=SC2086  # BUILD_ARGS is a list of words on purpose
    "${ENGINE[@]}" build "${BUILD_FLAGS[@]}" -t "$IMAGE" ${BUILD_ARGS:-} -f "$DOCKERFILE" . \
        || die "image build failed"
fi

# --- run, as Kubernetes would ------------------------------------------------------------------
log "starting $NAME on 127.0.0.1:$HOST_PORT"
"${ENGINE[@]}" run -d --name "$NAME" "${RUN_FLAGS[@]}" \
    -p "127.0.0.1:${HOST_PORT}:8000" \
    --read-only --tmpfs /tmp:rw,size=64m \
    --cap-drop ALL --security-opt no-new-privileges \
    -e CNNSERVE_DRAIN_SECONDS=1 -e CNNSERVE_SHUTDOWN_TIMEOUT_SECONDS=10 \
    "$IMAGE" >/dev/null || die "container did not start"
STARTED=1

started=$SECONDS
deadline=$((SECONDS + READY_TIMEOUT))
until curl -fsS -o /dev/null "$BASE/readyz" 2>/dev/null; do
    running=$("${ENGINE[@]}" inspect -f '{{.State.Running}}' "$NAME" 2>/dev/null || echo false)
    [[ $running == true ]] || die "container exited before it was ready"
    (( SECONDS < deadline )) || die "/readyz not ready after ${READY_TIMEOUT}s"
    sleep 1
done
log "ready after $((SECONDS - started))s"
curl -fsS -o /dev/null "$BASE/healthz" || die "/healthz failed while /readyz passes"

# --- predict -----------------------------------------------------------------------------------
# A 32x32 RGB PNG made with the standard library only (no Pillow needed on the host).
python3 - "$WORK/image.png" <<'EOF'
import struct, sys, zlib
w = h = 32
rows = b"".join(b"\x00" + bytes(v for x in range(w) for v in (x * 8 % 256, y * 8 % 256, (x + y) * 4 % 256))
               for y in range(h))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
open(sys.argv[1], "wb").write(png)
EOF

post() {  # post MODE -> prints the HTTP status, body in $WORK/response.json
    case $1 in
        multipart:*) curl -sS -o "$WORK/response.json" -w '%{http_code}' -X POST \
                         -F "${1#multipart:}=@$WORK/image.png;type=image/png" "$BASE/predict" ;;
        raw)         curl -sS -o "$WORK/response.json" -w '%{http_code}' -X POST \
                         -H 'Content-Type: image/png' --data-binary "@$WORK/image.png" "$BASE/predict" ;;
        *) die "unknown upload mode $1" ;;
    esac
}
if [[ $SMOKE_UPLOAD == auto ]]; then modes=(multipart:file raw); else modes=("$SMOKE_UPLOAD"); fi
status=none
for mode in "${modes[@]}"; do
    status=$(post "$mode") || die "POST /predict failed to connect"
    log "POST /predict ($mode) -> $status"
    [[ $status == 200 ]] && break
done
[[ $status == 200 ]] || die "POST /predict answered $status: $(head -c 500 "$WORK/response.json")"
python3 - "$WORK/response.json" <<'EOF' || die "response is not JSON with \"results\": $(head -c 500 "$WORK/response.json")"
import json, sys
body = json.load(open(sys.argv[1]))
assert isinstance(body, dict) and body.get("results"), body
print("[smoke] results:", json.dumps(body["results"])[:300], file=sys.stderr)
EOF
curl -fsS "$BASE/metrics" | grep -q '^cnnserve_images_total{' || die "/metrics does not count images"

# --- graceful stop -----------------------------------------------------------------------------
log "stopping (SIGTERM, 30 s grace)"
"${ENGINE[@]}" stop -t 30 "$NAME" >/dev/null
code=$("${ENGINE[@]}" inspect -f '{{.State.ExitCode}}' "$NAME")
[[ $code == 0 ]] || die "server exited with code $code after SIGTERM (137: killed, did not shut down in time)"
log "OK"
