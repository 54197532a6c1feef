# cnnserve container images: one Dockerfile, two flavours picked by the FLAVOUR build argument.
#
#   docker build -t cnnserve:cpu .                          # python:3.11-slim, plain `onnxruntime` (default)
#   docker build --build-arg FLAVOUR=gpu -t cnnserve:gpu .  # CUDA 13 + cuDNN 9 runtime, `onnxruntime-gpu`
#
# The flavour picks a base stage (cpu-base or gpu-base); the builder and the runtime stage are the
# same for both. Only runtime dependencies go in (no torch, no dev tools). The bundled model
# repository (models/) lands in /models; mount a volume over /models to serve other models.
# Run:  docker run --rm --shm-size=256m -p 8000:8000 -p 8001:8001 cnnserve:cpu      (GPU: add --gpus all)
# Any setting: -e CNNSERVE_<FIELD>=... or flags after the image name (`cnnserve serve` is the entrypoint).
# `cnnserve serve` runs several processes by default (--workers auto: one per core of the container's
# CPU limit; with a GPU, front ends plus one device executor). They share images and results in
# /dev/shm: docker's default 64 MiB is enough for the bundled model, --shm-size gives headroom.

# The CUDA major of the base must match the onnxruntime-gpu wheel: PyPI's onnxruntime-gpu
# 1.31.x is built against CUDA 13.0 / cuDNN 9 (capi/build_and_package_info.py: cuda_version='13.0';
# libonnxruntime_providers_cuda.so needs libcudart.so.13, libcublas.so.13). A CUDA 12 base would
# make ORT fall back to CPU (or refuse with CNNSERVE_REQUIRE_GPU=true).
ARG FLAVOUR=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# GPU base: official NVIDIA CUDA runtime + cuDNN image, Ubuntu 24.04's python3 (3.12)
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-base
ARG DEBIAN_FRONTEND=noninteractive
# Unpinned apt packages on purpose: the base image tag pins the distribution release, and
# pinning exact Ubuntu package versions breaks the build whenever the archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
# NVIDIA_* tell the NVIDIA container runtime / device plugin what to expose (the base sets them too).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CNNSERVE_PROVIDERS=cuda,cpu

# ---------------------------------------------------------------------------------------------
# CPU base
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    CNNSERVE_PROVIDERS=cpu

# ---------------------------------------------------------------------------------------------
# Builder (both flavours): a virtual environment in /opt/venv, built on the flavour's own base so
# its interpreter is the one the runtime stage has.
# ---------------------------------------------------------------------------------------------
FROM ${FLAVOUR}-base AS builder
ARG FLAVOUR
ARG DEBIAN_FRONTEND=noninteractive
# onnxruntime flavour: the CPU image installs the plain `onnxruntime` package (the version
# requirements.lock pins, as onnxruntime-gpu for the GPU image): it has the CPU provider only and
# is ~20x smaller than onnxruntime-gpu, which would only fall back to CPU there anyway. Empty: by
# FLAVOUR (cpu: onnxruntime, gpu: onnxruntime-gpu); --build-arg ORT_PACKAGE=... overrides it.
ARG ORT_PACKAGE=
# Optional extras baked in (space-separated): tracing (OpenTelemetry, README "Tracing") is only
# imported when --tracing is on. Empty: the runtime dependencies alone.
ARG EXTRAS="tracing"
# Ubuntu's python3 lacks the venv module (python:3.11-slim has it).
# hadolint ignore=DL3008
RUN if ! python3 -c "import ensurepip" 2>/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY requirements.lock pyproject.toml scripts/runtime-requirements.py ./
# Dependencies first, in their own layer: rebuilt only when the lock (or pyproject.toml) changes. requirements.lock
# pins every runtime package (transitive ones too) at the versions tested; pyproject.toml only
# gives the library's ranges.
RUN default_ort=onnxruntime; if [ "${FLAVOUR}" = gpu ]; then default_ort=onnxruntime-gpu; fi \
 && python3 -m venv /opt/venv \
 && python runtime-requirements.py requirements.lock --ort-package "${ORT_PACKAGE:-$default_ort}" --extras "${EXTRAS}" \
      > requirements.txt \
 && pip install --no-cache-dir -r requirements.txt
COPY . .
# --no-deps: dependencies are in place (with the chosen onnxruntime flavour).
RUN pip install --no-cache-dir --no-deps . \
 && cnnserve serve --help > /dev/null \
 && python -c "import service.server"

# ---------------------------------------------------------------------------------------------
# Runtime (both flavours; the last stage, so the default target)
# ---------------------------------------------------------------------------------------------
FROM ${FLAVOUR}-base AS runtime
RUN groupadd --gid 10001 cnnserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin cnnserve
COPY --from=builder /opt/venv /opt/venv
COPY models/ /models/
ENV HOME=/tmp \
    CNNSERVE_MODEL_REPOSITORY=/models
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
# start-period is a grace period (a healthy answer ends it early): long enough for a GPU's first session.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CNNSERVE_HTTP_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["cnnserve", "serve"]
