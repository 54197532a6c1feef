"""The CPU overlay's pod under `podman play kube`: the rendered Deployment (and its ConfigMap) run
as Kubernetes would run them, with the image scripts/container-smoke.sh builds. Probes' routes
answer, /predict works, and SIGTERM drains (readiness false while serving, then exit 0).

Opt-in, since building the image takes minutes and needs the package index: build it first, then

    scripts/container-smoke.sh                                     # builds cnnserve:smoke-cpu
    CNNSERVE_CONTAINER_IMAGE=localhost/cnnserve:smoke-cpu pytest tests/test_containers.py

(deploy/README.md: the offline path, on a base made with debootstrap). Skipped, saying why,
where podman or runc is missing or the image is not there."""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.conftest import distinct_images, png_bytes
from tests.test_deploy import render

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install -e '.[dev]')")
IMAGE = os.environ.get("CNNSERVE_CONTAINER_IMAGE", "")
if not shutil.which("podman") or not shutil.which("runc"):
    pytest.skip("podman and runc are needed (apt-get install podman runc catatonit)", allow_module_level=True)
if not IMAGE:
    pytest.skip("CNNSERVE_CONTAINER_IMAGE is not set: build the image with scripts/container-smoke.sh first",
                allow_module_level=True)  # fmt: skip
if subprocess.run(["podman", "image", "exists", IMAGE], timeout=60).returncode != 0:
    pytest.skip(f"image {IMAGE} is not in podman's store", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def podman(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def pod(tmp_path):
    """The overlay's ConfigMap and Deployment (one replica, the image here, the HTTP port on the
    host); the Service, PDB and HPA need a cluster."""
    port = free_port()
    docs = [d for d in render("cpu") if d["kind"] in ("ConfigMap", "Deployment")]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = 1
    # Podman restarts an exited container as a kubelet would (Always); Never lets the test see the
    # exit status of the drain.
    deployment["spec"]["template"]["spec"]["restartPolicy"] = "Never"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container.update(image=IMAGE, imagePullPolicy="Never")
    next(p for p in container["ports"] if p["name"] == "http")["hostPort"] = port
    manifest = tmp_path / "cnnserve.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    # play kube takes no --ulimit, and podman's default limits (nofile 1048576) fail past the host's
    # hard limits: this process's own come from a containers.conf of the test's (with runc: crun
    # refuses the hybrid cgroup layout of these machines).
    nofile, nproc = (resource.getrlimit(r)[1] for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_NPROC))
    nofile, nproc = min(nofile, 65536), min(nproc, 32768)  # runc here refused nproc 65536 (hard: 96362)
    conf = tmp_path / "containers.conf"
    conf.write_text(
        f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        '[engine]\nruntime = "runc"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    played = podman("play", "kube", str(manifest), env=env)
    assert played.returncode == 0, played.stderr
    # Its answer lists "Pod:" and "Container:" IDs (names differ between podman versions).
    lines = played.stdout.split()
    container = lines[lines.index("Container:") + 1]
    try:
        yield f"http://127.0.0.1:{port}", container
    finally:
        logs = podman("logs", container).stderr
        podman("play", "kube", "--down", str(manifest), env=env)
        print(logs[-4000:])


def test_the_cpu_overlay_pod_serves_and_drains_under_podman_play_kube(pod):
    pod, container = pod
    deadline = time.monotonic() + 180  # the startup probe allows 300 s
    while True:
        try:
            if httpx.get(f"{pod}/readyz", timeout=3).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the pod never became ready"
        time.sleep(1)
    assert httpx.get(f"{pod}/healthz", timeout=3).status_code == 200  # the liveness probe's route
    image = png_bytes(distinct_images(1)[0])
    r = httpx.post(f"{pod}/predict", content=image, headers={"Content-Type": "image/png"}, timeout=30)
    assert r.status_code == 200 and r.json()["results"][0]["predictions"], r.text
    # SIGTERM, as the kubelet sends: readiness turns false while the server still answers.
    assert podman("kill", "--signal", "TERM", container).returncode == 0
    draining = time.monotonic() + 10
    while httpx.get(f"{pod}/readyz", timeout=3).status_code != 503:
        assert time.monotonic() < draining, "readiness stayed true after SIGTERM"
        time.sleep(0.2)
    assert httpx.get(f"{pod}/healthz", timeout=3).status_code == 200
    stopped = time.monotonic() + 60
    while podman("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true":
        assert time.monotonic() < stopped, "the server did not stop after its drain"
        time.sleep(0.5)
    assert podman("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip() == "0"
    assert '"message":"stopped"' in podman("logs", container).stderr
