#!/usr/bin/env bash
# A local stand-in for python:3.11-slim, made from Debian's own packages: where no registry of
# images can be reached (or none is wanted), debootstrap a minimal Debian 12 with Python 3.11 and
# import it into podman (or docker). Then build on it:
#
#   scripts/make-local-base.sh                          # -> localhost/cnnserve-base:bookworm
#   BUILD_ARGS="--build-arg PYTHON_IMAGE=localhost/cnnserve-base:bookworm" scripts/container-smoke.sh
#
# Environment: BASE_IMAGE (tag, default localhost/cnnserve-base:bookworm), SUITE (bookworm),
# MIRROR (Debian mirror, default deb.debian.org), CONTAINER_ENGINE (podman, or docker).
# Needs root and debootstrap (apt-get install debootstrap).
set -euo pipefail
BASE_IMAGE=${BASE_IMAGE:-localhost/cnnserve-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ENGINE=${CONTAINER_ENGINE:-podman}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase: essential packages, apt and passwd (useradd, for the image's non-root user); python3-venv
# for the builder's venv, ca-certificates for pip.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$root" "$MIRROR"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# The certificate authorities this host added (a TLS-inspecting proxy's, where there is one), so that
# pip in the build reaches the package index as the host does (PIP_CERT below: Debian 12's pip
# trusts only its own certifi bundle otherwise).
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null
fi
# python:3.11-slim's environment, as far as the Dockerfile relies on it: python3 on PATH, and
# `python` (the Dockerfile's build steps call it inside the venv, where it always exists).
tar -C "$root" -c . | "$ENGINE" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$BASE_IMAGE"
echo "imported $BASE_IMAGE"
