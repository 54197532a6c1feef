"""ModelRuntime on the real model: batch padding (one input shape for the runtime) changes no answer."""

from __future__ import annotations

import httpx
import numpy as np

from service.inference.repository import scan
from service.inference.runtime import ModelRuntime
from service.settings import Settings
from tests.conftest import MODEL_PATH, MODEL_REPOSITORY, ServerProcess, distinct_images, png_bytes

SPEC = next(s for s in scan(MODEL_REPOSITORY) if s.path == MODEL_PATH)


def test_padded_batches_give_the_unpadded_answers():
    # fp32 both: precision auto times INT8 against FP32 at load and may choose differently for each.
    exact = ModelRuntime(SPEC, Settings(providers=["cpu"], intra_op_threads=1, precision="fp32"))
    padded = ModelRuntime(
        SPEC, Settings(providers=["cpu"], intra_op_threads=1, precision="fp32", pad_batches="on", max_batch_size=16)
    )
    assert exact.pad_to == 0, "auto pads on CUDA only"
    assert padded.pad_to == 16
    images = distinct_images(20, seed=7)
    for n in (1, 5, 16, 20):  # below, at and (a direct call) above the padded size
        a, b = exact.run_batch([images[:n]]), padded.run_batch([images[:n]])
        assert b.logits.shape == (n, 10)
        np.testing.assert_allclose(b.logits, a.logits, atol=1e-4)
        assert b.ranked_labels == a.ranked_labels
    # A client's NaN tensor left in the padding buffer does not reach the next batch's answers.
    padded.run_batch([np.full((12, 3, 32, 32), np.nan, np.float32)])
    np.testing.assert_allclose(padded.run_batch([images[:2]]).logits, exact.run_batch([images[:2]]).logits, atol=1e-4)


def test_server_pads_when_asked_and_says_so():
    s = ServerProcess("--pad-batches", "on", "--max-batch-size", "8", "--drain-seconds", "0")
    try:
        assert "batches padded to 8" in s.log
        r = httpx.post(
            f"{s.http}/predict?top_k=2", content=png_bytes(distinct_images(1)[0]), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 200 and len(r.json()["results"][0]["predictions"]) == 2
    finally:
        assert s.stop() == 0, s.log
