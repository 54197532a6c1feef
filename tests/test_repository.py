"""The model repository's start-up check of model files, without a server."""

from __future__ import annotations

import pytest

from service.inference import repository
from tests.conftest import MODEL_PATH, MODEL_REPOSITORY


def test_every_bundled_model_file_passes():
    for path in MODEL_REPOSITORY.rglob("*.onnx"):
        assert repository.onnx_problem(path) is None, path


@pytest.mark.parametrize(
    "content,problem",
    [
        (b"", "holds no graph"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", "not protobuf at byte 0"),
        (b"<!DOCTYPE html><html>", "not protobuf at byte 0"),
        (MODEL_PATH.read_bytes()[:5000], "truncated"),
        (b"\x08\x07", "holds no graph"),  # ir_version only
    ],
)
def test_what_corrupt_model_files_usually_are_is_named(tmp_path, content, problem):
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert problem in (repository.onnx_problem(path) or "")


def test_check_files_names_a_bad_precision_variant(tmp_path):
    version_dir = tmp_path / "m" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(MODEL_PATH.read_bytes())
    (version_dir / "model.int8.onnx").write_bytes(b"oops")
    with pytest.raises(ValueError, match=r"model file .*model\.int8\.onnx is not an ONNX model"):
        repository.check_files(repository.scan(tmp_path))
