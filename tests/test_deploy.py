"""Checks of the container and deployment files against each other and against the server.

What is checked, and with what (tools from the dev extra in pyproject.toml; a test skips, saying which
tool is missing, only when that tool is not installed):

* Dockerfile: hadolint reports nothing; both flavours' base, one shared builder stage, entrypoint,
  ports, user, healthcheck, and the CUDA major of the GPU base image against the installed
  onnxruntime-gpu build.
* deploy/: the base and every overlay (and each with the optional monitoring and queue-autoscaling
  components) renders with `kubectl kustomize`; the rendered core resources pass
  kubernetes-validate in strict mode. deploy/README.md's step 4 runs as written, and its GPU
  queue-autoscaling example renders; the prometheus-adapter rule serves the HPA's metric.
  kubernetes-validate has no schemas for CRDs (ServiceMonitor, PrometheusRule,
  InferenceService): those get structural checks here instead (selectors, ports, probes, rule
  shape, PromQL syntax), see test_servicemonitor_*, test_prometheusrule_*, test_inferenceservice_*.
* Cross-checks: every CNNSERVE_* variable is a field of service.settings.Settings and its value
  parses; probe paths/ports and Service ports agree with the server's routes and settings
  defaults; the grace period outlasts drain + shutdown timeout; every metric named in the Grafana
  dashboard and the alert rules is one the server exports (service.metrics).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = ["cpu", "gpu"]
MONITORING = DEPLOY / "monitoring"
KSERVE = DEPLOY / "kserve"

# The server's probe routes (the server's own tests cover that it serves exactly these).
READINESS_PATH = "/readyz"
LIVENESS_PATH = "/healthz"
PROBE_PATHS = {READINESS_PATH, LIVENESS_PATH}

# Kinds kubernetes-validate has schemas for vs. the CRDs checked structurally below.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "InferenceService"}
# Kubernetes versions to validate against: the oldest we claim to support and the newest known.
K8S_VERSIONS = ["1.30.0", None]  # None: kubernetes-validate's latest

# The metrics the server contract promises (names before prometheus-client's suffixes).
CONTRACT_METRICS = {
    "cnnserve_requests": "counter",
    "cnnserve_request_duration_seconds": "histogram",
    "cnnserve_queue_duration_seconds": "histogram",
    "cnnserve_inference_duration_seconds": "histogram",
    "cnnserve_batch_size": "histogram",
    "cnnserve_queue_depth": "gauge",
    "cnnserve_images": "counter",
    "cnnserve_rejected": "counter",
    "cnnserve_model_info": "gauge",
}
# Series from outside cnnserve that expressions may use.
EXTERNAL_SERIES = {"up"}


# ----------------------------------------------------------------------------------------------
# tools
# ----------------------------------------------------------------------------------------------
def _tool(name: str) -> str:
    """A CLI from the dev extra in pyproject.toml: the one next to this interpreter (the venv), else PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not installed (pip install -e '.[dev]')")
    return found


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


@functools.cache
def _kustomize(path: str) -> tuple[dict, ...]:
    res = _run([_tool("kubectl"), "kustomize", path])
    assert res.returncode == 0, f"kubectl kustomize {path} failed:\n{res.stderr}"
    return tuple(d for d in yaml.safe_load_all(res.stdout) if d)


def render(variant: str, tmp_root: Path | None = None) -> list[dict]:
    """Rendered manifests of a variant: "base", "cpu", "gpu", "kserve", or an overlay with an
    optional component: "cpu+monitoring", "gpu+queue-autoscaling", ..."""
    if variant == "kserve":
        return list(_kustomize(str(KSERVE)))
    if variant == "base":
        return list(_kustomize(str(DEPLOY / "base")))
    overlay, _, component = variant.partition("+")
    if not component:
        return list(_kustomize(str(DEPLOY / "overlays" / overlay)))
    # An overlay with the optional component, as a user would write it (kustomize wants relative
    # paths to other kustomizations).
    assert component in COMPONENTS
    assert tmp_root is not None
    where = tmp_root / f"with-{overlay}-{component}"
    where.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(DEPLOY, where)
    (where / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/overlays/{overlay}\ncomponents:\n  - {rel}/{component}\n"
    )
    return list(_kustomize(str(where)))


COMPONENTS = ("monitoring", "queue-autoscaling", "tls", "network-policy", "tracing", "model-control")
VARIANTS = ["base", "cpu", "gpu", *(f"{o}+{c}" for c in COMPONENTS for o in OVERLAYS), "kserve"]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kustomize")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Deployment":
        return doc["spec"]["template"]["spec"]
    if doc["kind"] == "InferenceService":
        return doc["spec"]["predictor"]
    raise AssertionError(doc["kind"])


def workload(docs: list[dict]) -> dict:
    found = [d for d in docs if d["kind"] in ("Deployment", "InferenceService")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def server_container(doc: dict) -> dict:
    containers = pod_spec(doc)["containers"]
    assert len(containers) == 1, "one container per pod expected"
    return containers[0]


# ----------------------------------------------------------------------------------------------
# settings and metrics of the server
# ----------------------------------------------------------------------------------------------
@functools.cache
def settings_fields() -> dict:
    from service.settings import Settings

    return dict(Settings.model_fields)


def env_name(field: str) -> str:
    return "CNNSERVE_" + field.upper()


@functools.cache
def exported_metrics() -> dict[str, str]:
    """name -> type of every metric family in the server's registry."""
    from service.metrics import Metrics

    return {fam.name: fam.type for fam in Metrics().registry.collect()}


def exported_series() -> set[str]:
    """The series names PromQL can select, as prometheus-client exposes them."""
    out = set()
    for name, kind in exported_metrics().items():
        if kind == "counter":
            out.add(name + "_total")
        elif kind == "histogram":
            out.update(name + s for s in ("_bucket", "_sum", "_count"))
        else:
            out.add(name)
    return out


def cnnserve_env(docs: list[dict]) -> dict[str, str]:
    """Every CNNSERVE_* variable the server container sees: env entries plus envFrom ConfigMaps."""
    cont = server_container(workload(docs))
    cms = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for src in cont.get("envFrom", []):
        ref = src.get("configMapRef")
        assert ref, f"only configMapRef envFrom expected, got {src}"
        assert ref["name"] in cms, f"envFrom references ConfigMap {ref['name']} which is not rendered"
        assert "prefix" not in src
        env.update(cms[ref["name"]].get("data", {}))
    for item in cont.get("env", []):
        env[item["name"]] = item.get("value")
    return {k: v for k, v in env.items() if k.startswith("CNNSERVE_")}


def effective_settings(docs: list[dict], monkeypatch) -> object:
    """Settings as the server would build them from the rendered environment (no flags)."""
    from service.settings import Settings

    for key in list(os.environ):
        if key.startswith("CNNSERVE_"):
            monkeypatch.delenv(key)
    for key, value in cnnserve_env(docs).items():
        monkeypatch.setenv(key, value)
    return Settings()


# ----------------------------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------------------------
def dockerfile_stages(flavour: str = "cpu") -> dict[str, dict]:
    """Stage name -> {"from": base, "lines": [instruction lines]} (continuations joined), as built
    with ``--build-arg FLAVOUR=<flavour>``."""
    text = DOCKERFILE.read_text()
    logical, buf = [], ""
    for raw in text.splitlines():
        if not buf and (raw.lstrip().startswith("#") or not raw.strip()):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        logical.append((buf + raw).strip())
        buf = ""
    args = {}
    stages: dict[str, dict] = {}
    current = None
    for line in logical:
        word = line.split(None, 1)[0].upper()
        if word == "ARG" and current is None:
            name, _, default = line.split(None, 1)[1].partition("=")
            args[name] = flavour if name == "FLAVOUR" else default
        elif word == "FROM":
            m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
            assert m, f"every stage is named: {line}"
            base = re.sub(r"\$\{?(\w+)\}?", lambda g: args.get(g.group(1), g.group(0)), m.group(1))
            current = m.group(2)
            stages[current] = {"from": base, "lines": []}
        elif current is not None:
            stages[current]["lines"].append(line)
    return stages


def stage_root(stages: dict, name: str) -> str:
    """The external base image a stage is built on."""
    while stages[name]["from"] in stages:
        name = stages[name]["from"]
    return stages[name]["from"]


def instructions(stages: dict, name: str, word: str) -> list[str]:
    """Instructions `word` of a stage and its ancestors, base first."""
    chain = []
    while name in stages:
        chain.append(name)
        name = stages[name]["from"]
    out = []
    for stage in reversed(chain):
        out += [ln.split(None, 1)[1] for ln in stages[stage]["lines"] if ln.split(None, 1)[0].upper() == word]
    return out


def image_env(stages: dict, name: str) -> dict[str, str]:
    env = {}
    for body in instructions(stages, name, "ENV"):
        for key, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", body):
            env[key] = value.strip('"')
    return env


def test_hadolint_reports_nothing():
    res = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stdout + res.stderr


def test_dockerfile_flavours_and_runtime_contract():
    """One builder and one runtime stage serve both flavours; the FLAVOUR argument picks the base."""
    fields = settings_fields()
    for flavour, root in (("cpu", "python:3.11-slim"), ("gpu", "nvidia/cuda:")):
        stages = dockerfile_stages(flavour)
        assert list(stages)[-1] == "runtime", "the runtime stage is the last, so the default target"
        assert stage_root(stages, "runtime").startswith(root) and stage_root(stages, "builder").startswith(root)
        target = "runtime"
        entry = instructions(stages, target, "ENTRYPOINT")
        assert entry and json.loads(entry[-1]) == ["cnnserve", "serve"], "exec-form ENTRYPOINT [cnnserve, serve]"
        exposed = {int(p) for body in instructions(stages, target, "EXPOSE") for p in body.split()}
        assert exposed == {fields["http_port"].default, fields["grpc_port"].default}
        user = instructions(stages, target, "USER")
        assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) != 0, (
            "non-root numeric USER (lets Kubernetes verify runAsNonRoot)"
        )
        hc = instructions(stages, target, "HEALTHCHECK")
        assert hc and "/healthz" in hc[-1] and "python" in hc[-1]
        env = image_env(stages, target)
        assert env.get("CNNSERVE_MODEL_REPOSITORY") == "/models"
        assert env.get("CNNSERVE_PROVIDERS") == ("cuda,cpu" if flavour == "gpu" else "cpu")
        for key in env:
            if key.startswith("CNNSERVE_"):
                assert key[len("CNNSERVE_") :].lower() in fields, f"{key} in Dockerfile is no Settings field"
        copies = instructions(stages, target, "COPY")
        assert any(re.fullmatch(r"models/?\s+/models/?", c) for c in copies), "bundled models/ -> /models"
        assert any(c.startswith("--from=builder ") for c in copies)
    stages = dockerfile_stages()
    installing = [name for name, st in stages.items() if any("pip install" in ln for ln in st["lines"])]
    assert installing == ["builder"], f"one builder stage for both flavours, not {installing}"
    assert re.search(r"-cudnn-runtime-", stage_root(dockerfile_stages("gpu"), "runtime")), "GPU base: runtime + cuDNN"
    assert "torch" not in DOCKERFILE.read_text().replace("no torch", "")


def test_gpu_base_image_matches_onnxruntime_gpu_cuda_major():
    """The official onnxruntime-gpu wheel needs the CUDA major it was built for (1.31: CUDA 13)."""
    info = pytest.importorskip("onnxruntime.capi.build_and_package_info", reason="onnxruntime not installed")
    if getattr(info, "package_name", "") != "onnxruntime-gpu" or not getattr(info, "cuda_version", ""):
        pytest.skip("installed onnxruntime is not the CUDA build")
    base = stage_root(dockerfile_stages("gpu"), "runtime")
    m = re.match(r"nvidia/cuda:(\d+)\.", base)
    assert m, base
    assert m.group(1) == info.cuda_version.split(".")[0], (
        f"{base} vs onnxruntime-gpu {info.__version__} built for CUDA {info.cuda_version}"
    )


def test_image_uid_matches_pod_security_context():
    stages = dockerfile_stages()
    uid = int(instructions(stages, "runtime", "USER")[-1].split(":")[0])
    for variant in ("cpu", "gpu", "kserve"):
        spec = pod_spec(workload(render(variant)))
        assert spec["securityContext"]["runAsUser"] == uid


def test_dockerignore_keeps_context_small_but_complete():
    lines = {
        ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    }
    assert {".venv", "runs", ".git", "data"} <= lines
    for needed in ("pyproject.toml", "README.md", "service", "loadtest", "models", "scripts", "protos"):
        assert needed not in lines, f"{needed} is needed in the build context"


def _load_runtime_requirements():
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_requirements", ROOT / "scripts" / "runtime-requirements.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_runtime_requirements_swaps_onnxruntime_flavour():
    mod = _load_runtime_requirements()
    pyproject = {
        "project": {
            "dependencies": [
                "onnxruntime-gpu>=1.31.1,<1.32",
                "numpy>=2",
                "tritonclient[grpc]>=2.41",
                "Onnxruntime_GPU ; sys_platform == 'linux'",
            ]
        }
    }
    assert mod.runtime_requirements(pyproject, "onnxruntime") == [
        "onnxruntime>=1.31.1,<1.32",
        "numpy>=2",
        "tritonclient[grpc]>=2.41",
        "onnxruntime; sys_platform == 'linux'",
    ]
    assert mod.runtime_requirements(pyproject, "onnxruntime-gpu")[0] == "onnxruntime-gpu>=1.31.1,<1.32"
    with pytest.raises(SystemExit):
        mod.runtime_requirements({"project": {"dynamic": ["dependencies"]}}, "onnxruntime")


def test_runtime_requirements_adds_the_extras_the_image_bakes_in():
    """The Dockerfile's EXTRAS (default: tracing) come from pyproject's optional dependencies."""
    import tomllib

    mod = _load_runtime_requirements()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    plain = mod.runtime_requirements(pyproject, "onnxruntime")
    traced = mod.runtime_requirements(pyproject, "onnxruntime", ["tracing"])
    assert traced[: len(plain)] == plain
    assert traced[len(plain) :] == pyproject["project"]["optional-dependencies"]["tracing"]
    assert any(r.startswith("opentelemetry-sdk==") for r in traced)
    with pytest.raises(SystemExit, match="no extra"):
        mod.runtime_requirements(pyproject, "onnxruntime", ["no-such-extra"])
    assert 'ARG EXTRAS="tracing"' in DOCKERFILE.read_text()


def test_lean_cpu_requirements_are_this_projects_with_the_cpu_runtime():
    """requirements-cpu.txt (README "Install": the CPU-only install on Linux x86-64) is what
    scripts/runtime-requirements.py writes from pyproject.toml now, with no GPU runtime and no torch."""
    res = _run(
        [
            sys.executable,
            str(ROOT / "scripts" / "runtime-requirements.py"),
            str(ROOT / "pyproject.toml"),
            "--ort-package",
            "onnxruntime",
        ]
    )
    assert res.returncode == 0, res.stderr
    names = {re.split(r"[\s\[<>=!~;]", ln, maxsplit=1)[0].lower() for ln in res.stdout.splitlines()}
    assert "onnxruntime" in names and "onnxruntime-gpu" not in names
    assert "torch" not in names, "torch is a training dependency, not a runtime one"
    written = [ln for ln in (ROOT / "requirements-cpu.txt").read_text().splitlines() if not ln.startswith("#")]
    assert written == res.stdout.splitlines(), (
        "requirements-cpu.txt is stale: scripts/check-install.sh cpu > requirements-cpu.txt"
    )


# The image's platform and Python (the CPU image: python:3.11-slim on Linux x86-64).
IMAGE_ENVIRONMENT = {
    "python_version": "3.11",
    "python_full_version": "3.11.0",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
}


def test_the_plain_install_has_exactly_one_onnx_runtime_everywhere():
    """Both ONNX Runtime packages install the module `onnxruntime`: on every platform and Python
    exactly one of pyproject's dependencies names one of them (the GPU one on Linux x86-64 only)."""
    from packaging.requirements import Requirement

    dependencies = [
        Requirement(line) for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    for version in ("3.10", "3.11", "3.12", "3.13", "3.14"):
        for system, machine in (("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"), ("win32", "AMD64")):
            env = {
                "python_version": version,
                "python_full_version": f"{version}.0",
                "sys_platform": system,
                "platform_machine": machine,
            }
            runtimes = [r.name for r in dependencies if r.name.startswith("onnxruntime") and r.marker.evaluate(env)]
            expected = "onnxruntime-gpu" if (system, machine) == ("linux", "x86_64") else "onnxruntime"
            assert runtimes == [expected], (version, system, machine, runtimes)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [
        r
        for extra in optional.values()
        for r in extra
        if r.lower().startswith(("onnxruntime", "cnnserve[cpu", "cnnserve[gpu"))
    ]
    assert not named, f"an extra naming an ONNX Runtime would install it beside the base one: {named}"


def test_the_image_lock_is_within_the_library_ranges_and_picks_the_flavour():
    """requirements.lock (what the image installs) pins every runtime requirement of pyproject.toml
    that applies in the image, each inside its range; the Dockerfile installs from it with the
    flavour's ONNX Runtime."""
    from packaging.requirements import Requirement

    mod = _load_runtime_requirements()
    lock_text = (ROOT / "requirements.lock").read_text()
    pins = {
        Requirement(line).name.lower().replace("_", "-"): line.split("==")[1]
        for line in mod.lock_requirements(lock_text, "onnxruntime")
    }
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in mod.runtime_requirements(project, "onnxruntime"):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENVIRONMENT):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not in requirements.lock"
        assert req.specifier.contains(pins[name]), f"requirements.lock's {name}=={pins[name]} is outside {line!r}"
    gpu = mod.lock_requirements(lock_text, "onnxruntime-gpu")
    assert f"onnxruntime-gpu=={pins['onnxruntime']}" in gpu and not any(x.startswith("onnxruntime==") for x in gpu)
    assert "requirements.lock" in (ROOT / "Dockerfile").read_text()


# ----------------------------------------------------------------------------------------------
# rendering and schema validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_renders_and_validates_strict(variant, tmp_root):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[dev]')"
    )
    docs = render(variant, tmp_root)
    assert docs
    problems = []
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # no schema in kubernetes-validate: structural tests below
        for version in K8S_VERSIONS:
            version = version or kv.utils.latest_version()
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                problems.append(
                    f"{doc['kind']}/{doc['metadata']['name']} @ {version}: {'.'.join(map(str, e.path))}: {e.message}"
                )
            except kv.SchemaNotFoundError as e:
                problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not problems, "\n".join(problems)


def test_kubernetes_validate_cli_strict(tmp_root, tmp_path):
    """The CLI, as a person would run it, on a whole rendered overlay: rc 0, only CRDs unchecked."""
    cli = _tool("kubernetes-validate")
    for variant in ("cpu", "gpu+monitoring"):
        out = tmp_path / f"{variant}.yaml"
        out.write_text(yaml.safe_dump_all(render(variant, tmp_root)))
        res = _run([cli, "--strict", "--quiet", str(out)])
        assert res.returncode == 0, res.stdout + res.stderr
        assert "ERROR" not in res.stdout
        unchecked = re.findall(r"Couldn't find schema for kind (\w+)", res.stdout)
        assert set(unchecked) <= CRD_KINDS, unchecked


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_resource_is_labelled(variant, tmp_root):
    for doc in render(variant, tmp_root):
        labels = doc["metadata"].get("labels", {})
        if doc["kind"] != "ConfigMap":
            assert labels.get("app.kubernetes.io/name") == "cnnserve", f"{doc['kind']} lacks app.kubernetes.io/name"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_present(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"])
    assert not set(kinds) & CRD_KINDS, "overlays must apply on clusters without optional CRDs"


# ----------------------------------------------------------------------------------------------
# settings cross-checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_cnnserve_env_names_are_settings_fields(variant):
    fields = settings_fields()
    env = cnnserve_env(render(variant))
    assert env, "settings come from CNNSERVE_* variables"
    unknown = sorted(k for k in env if k[len("CNNSERVE_") :].lower() not in fields)
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_every_configmap_key_is_a_settings_field(variant):
    fields = settings_fields()
    docs = render(variant)
    cm = one(docs, "ConfigMap")
    for key in cm["data"]:
        assert key.startswith("CNNSERVE_") and key[len("CNNSERVE_") :].lower() in fields, key
    cont = server_container(workload(docs))
    assert cont["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]


@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_settings_values_parse(variant, monkeypatch):
    s = effective_settings(render(variant), monkeypatch)
    assert s.model_repository == "/models"


def test_overlay_specific_settings(monkeypatch):
    cpu = effective_settings(render("cpu"), monkeypatch)
    assert cpu.providers == ["CPUExecutionProvider"] and cpu.require_gpu is False
    gpu = effective_settings(render("gpu"), monkeypatch)
    assert gpu.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"] and gpu.require_gpu is True


@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_grace_period_outlasts_drain_and_shutdown(variant, monkeypatch):
    docs = render(variant)
    s = effective_settings(docs, monkeypatch)
    grace = pod_spec(workload(docs))["terminationGracePeriodSeconds"]
    # Margin for the interpreter's exit and the SIGTERM -> handler delay.
    assert grace >= s.drain_seconds + s.shutdown_timeout_seconds + 10, grace


# ----------------------------------------------------------------------------------------------
# probes, ports, Service
# ----------------------------------------------------------------------------------------------
def _port_number(cont: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in cont["ports"]}
    assert port in named, f"probe port {port!r} is not a container port"
    return named[port]


@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_probes(variant, monkeypatch):
    docs = render(variant)
    s = effective_settings(docs, monkeypatch)
    defaults = settings_fields()
    cont = server_container(workload(docs))
    ports = {p["containerPort"] for p in cont["ports"]}
    assert ports == {s.http_port, s.grpc_port} == {defaults["http_port"].default, defaults["grpc_port"].default}

    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = cont[kind]
        if "grpc" in probe:  # a standard grpc.health.v1 probe is fine for liveness only
            assert kind == "livenessProbe"
            assert probe["grpc"]["port"] == s.grpc_port
            assert probe["grpc"].get("service", "") == ""
            continue
        get = probe["httpGet"]
        assert get["path"] in PROBE_PATHS
        assert _port_number(cont, get["port"]) == s.http_port
    assert cont["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
    assert cont["startupProbe"]["httpGet"]["path"] == READINESS_PATH
    if "httpGet" in cont["livenessProbe"]:
        assert cont["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
    # Startup is generous (model load, CUDA init); the others only start after it passes.
    startup = cont["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    # Readiness notices the SIGTERM drain before the listeners close.
    ready = cont["readinessProbe"]
    assert ready["periodSeconds"] <= s.drain_seconds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_ports_and_selector(overlay):
    docs = render(overlay)
    svc = one(docs, "Service")
    dep = one(docs, "Deployment")
    defaults = settings_fields()
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert ports["http"]["port"] == defaults["http_port"].default
    assert ports["grpc"]["port"] == defaults["grpc_port"].default
    assert ports["grpc"]["appProtocol"] == "grpc"
    cont_ports = {p["name"]: p["containerPort"] for p in server_container(dep)["ports"]}
    for p in ports.values():
        assert _port_number(server_container(dep), p["targetPort"]) == cont_ports[p["name"]]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# ----------------------------------------------------------------------------------------------
# Deployment hardening, scaling, GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["cpu", "gpu", "kserve"])
def test_security_context(variant):
    doc = workload(render(variant))
    spec = pod_spec(doc)
    cont = server_container(doc)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = cont["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    tmp = [m for m in cont["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "writable /tmp on a read-only root"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in vols[tmp[0]["name"]]
    assert spec.get("enableServiceLinks") is False, "service links would inject CNNSERVE_* look-alikes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_annotations(overlay):
    dep = one(render(overlay), "Deployment")
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == settings_fields()["http_port"].default
    assert ann["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_and_pdb(overlay):
    docs = render(overlay)
    dep = one(docs, "Deployment")
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": dep["metadata"]["name"],
    }
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # CPU only: a metric the cluster cannot fetch would block every scale-down.
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    pdb = one(docs, "PodDisruptionBudget")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A PDB that can always be satisfied: never blocks node drains on a single replica.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"].get("minAvailable", 0) < hpa["spec"]["minReplicas"]


def test_gpu_overlay_schedules_on_gpus():
    dep = one(render("gpu"), "Deployment")
    spec = pod_spec(dep)
    cont = server_container(dep)
    assert cont["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert cont["image"].endswith(":gpu")


def test_cpu_overlay_has_no_gpu():
    dep = one(render("cpu"), "Deployment")
    spec = pod_spec(dep)
    cont = server_container(dep)
    assert "nvidia.com/gpu" not in json.dumps(cont["resources"])
    assert "tolerations" not in spec and "nodeSelector" not in spec
    assert cont["image"].endswith(":cpu")


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_processes_and_threads_fit_cpu_request(variant, monkeypatch):
    """The pod's processes and ORT threads fit its CPU: either left to auto (sized from the
    cgroup's CPU limit, not the node's cores) or set so that front ends + executor + ORT threads
    fit the CPU request."""
    docs = render(variant)
    s = effective_settings(docs, monkeypatch)
    resources = server_container(workload(docs))["resources"]
    cpu = resources["requests"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if str(cpu).endswith("m") else float(cpu)
    if s.workers == "auto":
        assert s.intra_op_threads == 0 and "cpu" in resources["limits"]
    else:
        executors = 1 if s.executor == "device" else 0
        threads = s.intra_op_threads * (executors or s.workers)
        assert s.workers + executors + threads <= max(1, cores)


# ----------------------------------------------------------------------------------------------
# CRDs: structural checks (kubernetes-validate has no schemas for them)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_servicemonitor_matches_service(overlay, tmp_root):
    docs = render(f"{overlay}+monitoring", tmp_root)
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    svc_ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {
            "port",
            "path",
            "scheme",
            "interval",
            "scrapeTimeout",
            "honorLabels",
            "relabelings",
            "metricRelabelings",
        }
        assert ep["port"] in svc_ports and ep["port"] == "http"
        assert ep["path"] == "/metrics"
    # The Grafana dashboard ships as a ConfigMap for the sidecar.
    dash = [d for d in by_kind(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(dash) == 1
    json.loads(next(iter(dash[0]["data"].values())))


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def test_prometheusrule_structure():
    doc = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    assert set(doc["spec"]) == {"groups"}
    names = set()
    for group in doc["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert ("alert" in rule) != ("record" in rule)
            if "alert" in rule:
                assert rule["alert"] not in names
                names.add(rule["alert"])
                assert rule["labels"]["severity"] in {"critical", "warning", "info"}
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]
                assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
    # The alerts this service promises.
    covered = " ".join(sorted(names)).lower()
    for topic in ("errorrate", "latency", "queue", "reject", "down"):
        assert topic in covered, f"no alert about {topic}"


def test_inferenceservice_structure():
    docs = render("kserve")
    isvc = one(docs, "InferenceService")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment", (
        "two container ports need RawDeployment (Knative allows one)"
    )
    pred = isvc["spec"]["predictor"]
    cont = server_container(isvc)
    assert cont["name"] == "kserve-container"
    assert cont["image"].startswith("registry.example.com/cnnserve:")
    assert [p["containerPort"] for p in cont["ports"]] == [8000, 8001]
    assert pred["minReplicas"] <= pred["maxReplicas"]
    # What kubernetes-validate would check on a Deployment's pod template: validate the
    # predictor's PodSpec-shaped part against the core PodSpec schema by wrapping it in a Pod.
    kv = pytest.importorskip("kubernetes_validate")
    pod_fields = {
        k: v
        for k, v in pred.items()
        if k
        not in {
            "minReplicas",
            "maxReplicas",
            "scaleTarget",
            "scaleMetric",
            "containerConcurrency",
            "timeout",
            "canaryTrafficPercent",
            "logger",
            "batcher",
        }
    }
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "cnnserve-predictor"}, "spec": pod_fields}
    kv.validate(pod, kv.utils.latest_version(), strict=True)


# ----------------------------------------------------------------------------------------------
# dashboards and alerts use only exported metrics; PromQL parses
# ----------------------------------------------------------------------------------------------
METRIC_RE = re.compile(r"\bcnnserve_[a-z_]+")
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$namespace": "ns", "$pod": "pod"}


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    out = []

    def walk(panels):
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dashboard()["panels"])
    return out


def _promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def _selected_series(expr: str) -> set[str]:
    promql_parser = pytest.importorskip("promql_parser", reason="promql-parser not installed (pip install -e '.[dev]')")
    try:
        ast = promql_parser.parse(expr)
    except ValueError as e:
        raise AssertionError(f"PromQL does not parse: {e}\n{expr}") from None
    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            names.add(name)
        return True

    promql_parser.walk(ast, visit)
    return names


def test_server_exports_the_contract_metrics():
    exported = exported_metrics()
    for name, kind in CONTRACT_METRICS.items():
        assert exported.get(name) == kind, f"{name} ({kind}) not exported as such: {exported.get(name)}"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_expressions_use_only_exported_metrics(source):
    exprs = dashboard_exprs() if source == "dashboard" else [r["expr"] for r in alert_rules()]
    assert exprs
    series = exported_series()
    for expr in exprs:
        # The plain regex, on the raw text (catches names anywhere in the expression).
        for name in METRIC_RE.findall(expr):
            assert name in series, f"{name} is not exported by the server (in {expr!r})"
        # The parsed selectors: syntax is valid and nothing but cnnserve series and `up`.
        for name in _selected_series(_promql(expr)):
            assert name in series or name in EXTERNAL_SERIES, f"{name} in {expr!r}"


def test_dashboard_variables_use_exported_metrics():
    series = exported_series()
    for var in dashboard()["templating"]["list"]:
        for name in METRIC_RE.findall(json.dumps(var)):
            assert name in series, name


def test_dashboard_covers_the_service():
    exprs = dashboard_exprs()
    text = "\n".join(exprs)
    for needed in (
        "rate(cnnserve_images_total",
        "cnnserve_requests_total",
        "cnnserve_request_duration_seconds_bucket",
        "cnnserve_queue_duration_seconds_bucket",
        "cnnserve_inference_duration_seconds_bucket",
        "cnnserve_queue_depth",
        "cnnserve_batch_size_bucket",
        "cnnserve_rejected_total",
    ):
        assert needed in text, f"no panel on {needed}"
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (pod, le) (rate(cnnserve_request_duration_seconds_bucket" in text
    assert re.search(r"sum by \(pod, code\) \(rate\(cnnserve_requests_total", text)
    assert re.search(r"sum by \(pod, reason\) \(rate\(cnnserve_rejected_total", text)
    # Every series is filtered to the selected pods, and split by pod where it is a time series.
    for expr in exprs:
        assert 'pod=~"$pod"' in expr, expr
    for panel in dashboard()["panels"]:
        if panel["type"] in ("stat", "heatmap", "row"):
            continue  # totals over the selected pods, and the batch-size histogram over them
        for target in panel["targets"]:
            assert re.search(r"by \([^)]*\bpod\b", target["expr"]), f"{panel['title']}: not by (pod)"
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))


def test_deploy_readme_documents_the_adapter_rule():
    text = (DEPLOY / "README.md").read_text()
    assert "cnnserve_queue_depth" in text and "prometheus-adapter" in text
    assert "kubectl kustomize edit" not in text, "kubectl has no kustomize edit"
    assert "kubectl apply -k deploy/overlays/cpu" in text


# ----------------------------------------------------------------------------------------------
# queue-depth autoscaling (optional component) and the README's steps
# ----------------------------------------------------------------------------------------------
QUEUE = DEPLOY / "queue-autoscaling"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_queue_autoscaling_component_adds_the_queue_metric(overlay, tmp_root):
    """The component appends the Pods metric to the overlay's HPA and changes nothing else."""
    plain = one(render(overlay), "HorizontalPodAutoscaler")
    hpa = one(render(f"{overlay}+queue-autoscaling", tmp_root), "HorizontalPodAutoscaler")
    cpu, queue = hpa["spec"]["metrics"]
    assert cpu == plain["spec"]["metrics"][0]
    assert queue["type"] == "Pods" and queue["pods"]["metric"]["name"] == "cnnserve_queue_depth"
    assert queue["pods"]["target"] == {"type": "AverageValue", "averageValue": "32"}
    assert exported_metrics().get("cnnserve_queue_depth") == "gauge"
    assert {k: v for k, v in hpa["spec"].items() if k != "metrics"} == {
        k: v for k, v in plain["spec"].items() if k != "metrics"
    }


def _readme_block(marker: str, language: str) -> str:
    """The fenced block right after the HTML comment containing ``marker`` in deploy/README.md,
    its indentation removed."""
    text = (DEPLOY / "README.md").read_text()
    m = re.search(re.escape(marker) + r"[^\n]*-->\n([ \t]*)```" + language + r"\n(.*?)\n[ \t]*```", text, re.S)
    assert m, f"no {language} block after {marker!r} in deploy/README.md"
    indent = m.group(1)
    return "\n".join(line.removeprefix(indent) for line in m.group(2).splitlines()) + "\n"


def _clone_layout(tmp_path: Path) -> Path:
    """tmp/cnnserve/deploy: a copy of deploy/ where the README's paths expect the clone."""
    shutil.copytree(DEPLOY, tmp_path / "cnnserve" / "deploy")
    return tmp_path


def test_readme_step_4_runs_as_written(tmp_path):
    """Step 4's shell block, run with bash in the clone's parent folder: it writes an overlay that
    renders, retags the image and sets the namespace (kubectl has no `kustomize edit`)."""
    kubectl = _tool("kubectl")
    where = _clone_layout(tmp_path)
    script = _readme_block("runs this block as written", "sh")
    env = {**os.environ, "PATH": f"{Path(kubectl).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=where, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "image: registry.example.com/cnnserve:0.1.0-cpu"
    docs = list(_kustomize(str(where / "cnnserve-prod")))
    assert {d["metadata"].get("namespace") for d in docs} == {"cnnserve"}
    assert pod_spec(workload(docs))["containers"][0]["image"] == "registry.example.com/cnnserve:0.1.0-cpu"
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_readme_gpu_queue_example_renders_and_validates(tmp_path):
    """The Scaling section's GPU overlay with the queue component: the target is raised to 128."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    where = _clone_layout(tmp_path) / "gpu-queue"
    where.mkdir()
    (where / "kustomization.yaml").write_text(_readme_block("renders this overlay as written", "yaml"))
    docs = list(_kustomize(str(where)))
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert hpa["spec"]["metrics"][1]["pods"]["target"]["averageValue"] == "128"
    assert "nvidia.com/gpu" in pod_spec(workload(docs))["containers"][0]["resources"]["limits"]
    kv.validate(hpa, kv.utils.latest_version(), strict=True)


def test_prometheus_adapter_rule_serves_the_components_metric():
    """The adapter rule shipped with the component (and shown in the README) names the metric the
    HPA asks for, maps namespace and pod, and its query is PromQL once templated."""
    values = yaml.safe_load((QUEUE / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    patch = yaml.safe_load((QUEUE / "hpa-queue-depth.yaml").read_text())
    wanted = patch[0]["value"]["pods"]["metric"]["name"]
    assert rule["name"]["as"] == wanted and re.fullmatch(rule["name"]["matches"], wanted)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert _selected_series(rule["seriesQuery"]) == {wanted}
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", wanted)
        .replace("<<.LabelMatchers>>", 'namespace="cnnserve",pod=~"cnnserve-.*"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert _selected_series(query) == {wanted}
    readme = (DEPLOY / "README.md").read_text()
    shown = re.search(r"```yaml\n(rules:\n.*?)```", readme, re.S)
    assert shown and yaml.safe_load(shown.group(1)) == values, "README's rule differs from the shipped file"


# ----------------------------------------------------------------------------------------------
# TLS and NetworkPolicy components (README: Secure it)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tls_component_mounts_the_secret_the_settings_name_and_probes_over_https(overlay, tmp_root, monkeypatch):
    docs = render(f"{overlay}+tls", tmp_root)
    s = effective_settings(docs, monkeypatch)
    dep = workload(docs)
    cont, spec = server_container(dep), pod_spec(dep)
    mounts = {m["name"]: m for m in cont["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert {"tmp", "shm", "tls"} <= set(mounts), "the patch must add to the base's mounts, not replace them"
    tls = mounts["tls"]
    assert tls["readOnly"] is True
    secret = volumes["tls"]["secret"]
    assert secret["secretName"] == "cnnserve-tls" and secret["defaultMode"] & 0o007 == 0
    for path in (s.tls_cert_file, s.tls_key_file):
        assert path.startswith(tls["mountPath"] + "/"), path
    assert {Path(s.tls_cert_file).name, Path(s.tls_key_file).name} == {"tls.crt", "tls.key"}  # kubernetes.io/tls
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = cont[kind]["httpGet"]
        assert get["scheme"] == "HTTPS" and get["path"] in PROBE_PATHS, kind
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # Probes stay open: health is never restricted by the deployment.
    assert "health" not in s.restricted_apis


def test_cert_manager_certificate_example_issues_the_mounted_secret(tmp_root):
    cert = yaml.safe_load((DEPLOY / "tls" / "certificate.yaml").read_text())
    assert cert["apiVersion"] == "cert-manager.io/v1" and cert["kind"] == "Certificate"
    dep = workload(render("cpu+tls", tmp_root))
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    assert cert["spec"]["secretName"] == volumes["tls"]["secret"]["secretName"]
    svc = one(render("cpu"), "Service")
    assert svc["metadata"]["name"] in cert["spec"]["dnsNames"]
    assert "server auth" in cert["spec"]["usages"]
    assert cert["spec"]["privateKey"]["rotationPolicy"] == "Always"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_in_only_the_server_ports_and_no_egress(overlay, tmp_root):
    docs = render(f"{overlay}+network-policy", tmp_root)
    policy = one(docs, "NetworkPolicy")
    dep = workload(docs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == []
    defaults = settings_fields()
    container_ports = {p["containerPort"] for p in server_container(dep)["ports"]}
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == container_ports == {defaults["http_port"].default, defaults["grpc_port"].default}
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "an ingress rule without 'from' would let in everyone"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tracing_component_turns_tracing_on_with_a_collector(overlay, tmp_root, monkeypatch):
    """The component merges tracing on and a collector endpoint into the overlay's ConfigMap; the
    settings it yields validate, and the OTEL_* variables reach the container with them."""
    docs = render(f"{overlay}+tracing", tmp_root)
    assert effective_settings(docs, monkeypatch).tracing is True
    data = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    env = next(d for name, d in data.items() if name.startswith("cnnserve-config"))["data"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://") and env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1
    assert cnnserve_env(render(overlay)).get("CNNSERVE_TRACING") in (None, "false")  # off without it
