"""Attribution and layers without a server: a real onnxruntime session on the real model.

The deletion test checks faithfulness, not shape: deleting the most-attributed quarter of an
image's pixels must lower the explained class's probability clearly more than deleting a random
quarter."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.layers_onnx import add_layer_outputs
from service.explain import attribution, layers
from service.inference.repository import scan
from service.inference.runtime import ModelRuntime
from service.settings import Settings
from tests.conftest import MODEL_PATH, MODEL_REPOSITORY, SHARED_CIFAR, distinct_images

LAYERS_PATH = MODEL_PATH.with_name(layers.LAYERS_FILENAME)


@pytest.fixture(scope="module")
def runtime() -> ModelRuntime:
    return ModelRuntime(scan(MODEL_REPOSITORY)[0], Settings(providers=["cpu"], intra_op_threads=1))


@pytest.fixture(scope="module")
def fill(runtime) -> np.ndarray:
    return attribution.fill_colour(runtime.preprocessing)


def explain(runtime, image, fill, method, seed=0, target=None):
    batch, plan = attribution.perturb(image, fill, method, seed)
    probs = runtime.run_batch([batch]).probabilities
    target = int(probs[0].argmax()) if target is None else target
    return attribution.attribute(plan, probs, target), probs[0], target


def test_fill_is_the_normalised_zero(runtime, fill):
    x = runtime.normalizer(np.broadcast_to(fill, (1, 32, 32, 3)).copy())
    assert np.abs(x).max() < 0.02  # the mean colour, up to uint8 rounding


@pytest.mark.parametrize("method,passes", [("occlusion", 226), ("rise", 256)])
def test_cost_and_first_row_is_the_image(fill, method, passes):
    image = distinct_images(1, seed=3)[0]
    batch, plan = attribution.perturb(image, fill, method)
    assert batch.dtype == np.uint8 and batch.shape == (passes, 32, 32, 3)
    assert np.array_equal(batch[0], image)
    assert plan.masks.shape == (passes - 1, 32, 32)
    assert not np.array_equal(batch[1], image)


def test_deterministic_with_a_seed(runtime, fill):
    image = distinct_images(1, seed=5)[0]
    for method in attribution.METHODS:
        a, _, _ = explain(runtime, image, fill, method, seed=7)
        b, _, _ = explain(runtime, image, fill, method, seed=7)
        assert np.array_equal(a, b), method
    c, _, _ = explain(runtime, image, fill, "rise", seed=8)
    assert not np.array_equal(a, c), "another seed draws other masks"


def test_occlusion_finds_the_only_informative_square(fill):
    """A toy 'model' whose probability is the brightness of one 4x4 square: occlusion must point there."""
    image = np.full((32, 32, 3), 200, np.uint8)
    batch, plan = attribution.perturb(image, fill, "occlusion")
    score = batch[:, 12:16, 20:24].astype(np.float32).mean(axis=(1, 2, 3)) / 255.0
    probs = np.stack([score, 1 - score], axis=1)
    values = attribution.attribute(plan, probs, 0)
    assert values[12:16, 20:24].min() > 0
    outside = np.ones((32, 32), bool)
    outside[10:18, 18:26] = False  # squares overlapping the informative one, with stride 2
    assert np.abs(values[outside]).max() == 0


@pytest.fixture(scope="module")
def real_images():
    """The page's ten samples plus 40 more held-out validation images (needs the shared data)."""
    if not SHARED_CIFAR.exists():
        pytest.skip(f"CIFAR-10 images not present at {SHARED_CIFAR}: no real images for the deletion test")
    from export.data import load_split
    from service.explain.samples import load_samples
    from service.inference.codec import decode_image

    samples = load_samples(SHARED_CIFAR)
    sample_pixels = np.stack([decode_image(s.png, 1 << 20) for s in samples])
    ds = load_split(SHARED_CIFAR, "val")
    more = ds.images[np.random.default_rng(1).choice(len(ds), 40, replace=False)]
    return np.concatenate([sample_pixels, more])


def deletion_figures(runtime, images, fill, method) -> np.ndarray:
    """[n, 3]: the explained class's probability on the image, with its top quarter deleted and
    with a random quarter deleted."""
    rows = []
    for image in images:
        values, probs, target = explain(runtime, image, fill, method)
        deleted = runtime.run_batch([attribution.deletion_images(image, values, fill)]).probabilities[:, target]
        rows.append((probs[target], deleted[0], deleted[1]))
    return np.array(rows)


def test_deletion_test_on_real_images(runtime, fill, real_images):
    figures = deletion_figures(runtime, real_images, fill, attribution.DEFAULT_METHOD)
    original, top, random = figures.mean(axis=0)
    print(f"\nocclusion on {len(figures)} images: p={original:.3f}, top quarter deleted {top:.3f}, random {random:.3f}")
    assert top < random - 0.08, (original, top, random)
    assert (figures[:, 1] < figures[:, 2]).mean() >= 0.6
    samples = figures[:10]
    assert samples[:, 1].mean() < samples[:, 2].mean(), "the ten page samples on their own"


def test_rise_beats_random_deletion_too(runtime, fill, real_images):
    figures = deletion_figures(runtime, real_images[:20], fill, "rise")
    _, top, random = figures.mean(axis=0)
    assert top < random, (top, random)


# ---- layers --------------------------------------------------------------------------------------
def test_layers_onnx_is_the_served_graph_with_named_outputs():
    """The committed companion is exactly what export/layers_onnx.py makes from the served model."""
    served = onnx.load(str(MODEL_PATH))
    fresh = add_layer_outputs(served)
    committed = onnx.load(str(LAYERS_PATH))
    assert [o.name for o in committed.graph.output] == [*layers.LAYER_NAMES, layers.FILTERS]
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in committed.graph.initializer}
    for init in served.graph.initializer:
        assert np.array_equal(weights[init.name], onnx.numpy_helper.to_array(init)), init.name
    assert [n.op_type for n in fresh.graph.node] == [n.op_type for n in committed.graph.node]


def test_layer_activations_are_the_served_computation(runtime):
    companion = layers.LayerModel(LAYERS_PATH)
    x = runtime.normalizer(distinct_images(6, seed=2))
    acts = companion.run(x)
    served = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(acts["fc4"], served.run(None, {"input": x})[0], atol=1e-5)
    conv2 = acts["conv2"]
    pooled = conv2.reshape(6, 32, 16, 2, 16, 2).max(axis=(3, 5))
    np.testing.assert_allclose(acts["pool"], pooled, atol=1e-6)
    assert acts["conv1"].min() >= 0 and acts["fc3"].min() >= 0  # after ReLU
    assert companion.filters.shape == (32, 3, 3, 3)


def test_pictures_of_the_layers(runtime):
    companion = layers.LayerModel(LAYERS_PATH)
    acts = companion.run(runtime.normalizer(distinct_images(1, seed=4)))
    described = layers.describe(acts, 0, companion.filter_pngs)
    assert [d["name"] for d in described] == list(layers.LAYER_NAMES)
    by_name = {d["name"]: d for d in described}
    assert len(by_name["conv1"]["filters"]) == 32 and len(by_name["conv1"]["maps"]) == 32
    assert len(by_name["pool"]["maps"]) == 32 and len(by_name["fc3"]["values"]) == 512
    from service.inference.codec import decode_image

    first = decode_image(by_name["conv1"]["maps"][0], 1 << 20)
    assert first.shape == (32, 32, 3)
    i = int(np.argmax(by_name["conv1"]["maxima"]))
    assert by_name["conv1"]["maxima"][i] == pytest.approx(float(acts["conv1"][0, i].max()))
    grey = decode_image(by_name["conv1"]["maps"][i], 1 << 20)[..., 0]
    expected = np.clip(acts["conv1"][0, i] * (255.0 / acts["conv1"][0, i].max()), 0, 255).astype(np.uint8)
    assert np.array_equal(grey, expected)
