"""Settings: every field is a flag and a CNNSERVE_* variable, shown in --help; bad values are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from pydantic import ValidationError

from bench import serverproc
from service.cli import build_parser, settings_from_args
from service.settings import Settings, allowed_values
from tests.conftest import ROOT, distinct_images, png_bytes


def test_environment_flags_and_defaults(monkeypatch):
    monkeypatch.setenv("CNNSERVE_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("CNNSERVE_PROVIDERS", "cpu")
    monkeypatch.setenv("CNNSERVE_REQUIRE_GPU", "false")
    args = build_parser().parse_args(["serve", "--max-queue-delay-ms", "2.5", "--no-require-gpu"])
    s = settings_from_args(args)
    assert s.max_batch_size == 32 and s.max_queue_delay_ms == 2.5
    assert s.providers == ["CPUExecutionProvider"] and s.require_gpu is False
    assert Settings().default_top_k == 5
    args = build_parser().parse_args(["serve", "--max-batch-size", "8"])
    assert settings_from_args(args).max_batch_size == 8  # the flag wins over the environment


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_batch_size", "0"),
        ("default_top_k", "11"),
        ("providers", "quantum"),
        ("log_level", "LOUD"),
        ("http_port", "70000"),
    ],
)
def test_bad_values_are_refused(monkeypatch, field, value):
    monkeypatch.setenv(f"CNNSERVE_{field.upper()}", value)
    with pytest.raises(ValidationError):
        Settings()


def test_help_lists_every_setting_with_its_environment_variable():
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in text
        assert f"CNNSERVE_{name.upper()}" in text


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (["--http-port", "99999"], {}, "--http-port 99999 (environment variable CNNSERVE_HTTP_PORT)"),
        (["--max-batch-size", "-3"], {}, "--max-batch-size -3 (environment variable CNNSERVE_MAX_BATCH_SIZE)"),
        (["--providers", "quantum"], {}, "--providers quantum (environment variable CNNSERVE_PROVIDERS)"),
        ([], {"CNNSERVE_LOG_FORMAT": "xml"}, "CNNSERVE_LOG_FORMAT=xml (flag --log-format)"),
        ([], {"CNNSERVE_MAX_QUEUE_DELAY_MS": "soon"}, "CNNSERVE_MAX_QUEUE_DELAY_MS=soon (flag --max-queue-delay-ms)"),
    ],
)
def test_bad_settings_name_the_flag_the_variable_the_value_and_what_is_allowed(args, env, expected):
    out = _serve(*args, env=env)
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr, out.stderr
    assert "allowed: " in out.stderr
    assert "pydantic" not in out.stderr and "https://" not in out.stderr
    field = (args[0][2:] if args else next(iter(env))[len("CNNSERVE_") :].lower()).replace("-", "_")
    assert f"allowed: {allowed_values(field)}" in out.stderr


def test_allowed_values_come_from_the_fields_types_and_bounds():
    assert allowed_values("http_port") == "an integer >= 0 and <= 65535"
    assert allowed_values("log_format") == "one of text, json"
    assert allowed_values("require_gpu") == "true or false"
    assert allowed_values("max_queue_delay_ms") == "a number >= 0.0 and <= 10000"
    assert allowed_values("workers") == "an integer >= 1 and <= 256, or auto"


def test_a_bad_value_of_a_union_setting_is_one_line():
    out = _serve("--workers", "two")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[1:] == [
        "--workers two (environment variable CNNSERVE_WORKERS): not a valid value; "
        "allowed: an integer >= 1 and <= 256, or auto"
    ], out.stderr


def test_help_lists_every_command_and_every_choice():
    top = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert top.returncode == 0
    for command in ("serve", "classify", "loadtest", "import-model", "train", "export", "evaluate"):
        assert f"    {command} " in top.stdout, top.stdout
    out = _serve("--help")
    text = " ".join(out.stdout.split())
    for flag, choices in (
        ("--log-format", "{text,json}"),
        ("--log-level", "{DEBUG,INFO,WARNING,ERROR}"),
        ("--pad-batches", "{auto,on,off}"),
        ("--cudnn-conv-algo-search", "{EXHAUSTIVE,HEURISTIC,DEFAULT}"),
    ):
        assert f"{flag} {choices}" in text
    assert "[default: cuda,cpu; env CNNSERVE_PROVIDERS]" in text
    assert "| `--providers` | `CNNSERVE_PROVIDERS` | `cuda,cpu` |" in (ROOT / "README.md").read_text()
    assert Settings().providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`CNNSERVE_{n.upper()}`" not in readme]
    assert not missing, f"README's settings table lacks {missing}"


def test_json_log_lines(capsys):
    import json
    import logging

    from service import logs

    logs.configure("INFO", "json")
    try:
        logging.getLogger("cnnserve.test").warning("hello %s", "world")
        line = capsys.readouterr().err.strip().splitlines()[-1]
        doc = json.loads(line)
        assert doc["level"] == "WARNING" and doc["logger"] == "cnnserve.test" and doc["message"] == "hello world"
        assert doc["ts"].endswith("Z")
    finally:
        logging.getLogger().handlers.clear()


def test_serve_from_another_folder_serves_the_bundled_model_and_says_samples_are_missing(tmp_path):
    """`cd /tmp && cnnserve serve`: the default model repository is found from the installation."""
    s = serverproc.ServerProcess(
        "--workers",
        "1",
        "--executor",
        "worker",
        "--intra-op-threads",
        "1",
        "--drain-seconds",
        "0",
        "--samples-data",
        "no-such-data.tar.gz",
        model_repository=None,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
    )
    try:
        image = png_bytes(distinct_images(1)[0])
        r = httpx.post(f"{s.http}/predict", content=image, headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["model"] == "cifar10", r.text
        for _ in range(2):
            assert httpx.get(f"{s.http}/samples").json()["samples"] == []
    finally:
        assert s.stop() == 0, s.log
    said = [line for line in s.lines if "no sample images for the page" in line]
    assert len(said) == 1 and str(tmp_path / "no-such-data.tar.gz") in said[0], s.log


def test_a_missing_model_repository_names_the_flag(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--workers", "1", "--executor", "worker"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CNNSERVE_MODEL_REPOSITORY": "mine"},
    )
    assert out.returncode == 1, out.stderr
    assert f"model repository {tmp_path / 'mine'} is not a folder" in out.stderr
    assert "--model-repository or CNNSERVE_MODEL_REPOSITORY" in out.stderr


def test_without_onnx_runtime_serve_names_both_packages():
    """An install without ONNX Runtime (--no-deps) gets one line naming both packages, not a traceback.
    Its absence is made by blocking the import the standard way (a None entry in sys.modules)."""
    code = "import sys; sys.modules['onnxruntime'] = None; from service.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", code, "serve"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "cnnserve serve: ONNX Runtime is not installed" in out.stderr
    assert "pip install onnxruntime " in out.stderr and "onnxruntime-gpu" in out.stderr
    assert "requirements-cpu.txt" in out.stderr and "Traceback" not in out.stderr


def test_every_command_is_listed_and_every_option_has_help(capsys):
    import argparse

    from service import __version__
    from service.cli import __doc__ as cli_doc
    from service.cli import main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    listed = next(line for line in cli_doc.splitlines() if line.startswith("Commands:"))
    for name, command in sub.choices.items():
        assert name in listed, f"the top-level help's command list lacks {name}"
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"cnnserve {name} {action.option_strings[0]} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"cnnserve {__version__}"
