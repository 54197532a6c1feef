"""Settings: every field is a flag and a CNNSERVE_* variable, shown in --help; bad values are refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.cli import build_parser, settings_from_args
from service.settings import Settings
from tests.conftest import ROOT


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


def test_invalid_flag_value_exits_2_with_a_message():
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--max-batch-size", "-3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "max_batch_size" in out.stderr


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
