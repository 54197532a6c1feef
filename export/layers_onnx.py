"""The companion graph ``layers.onnx``: the served model plus its intermediate activations, by the
seed model's names.

The served ``model.onnx`` keeps its single ``logits`` output (extra outputs would cost every
request memory traffic). Beside it, ``layers.onnx`` is the same graph with these outputs:

=================  ======================  ============================================
name               shape                   what it is
=================  ======================  ============================================
``conv1``          [N, 32, 32, 32]         first convolution, after its ReLU
``conv2``          [N, 32, 32, 32]         second convolution, after its ReLU
``pool``           [N, 32, 16, 16]         2x2 max pooling of conv2
``fc3``            [N, 512]                first fully connected layer, after its ReLU
``fc4``            [N, 10]                 the logits (class scores before softmax)
``conv1_filters``  [32, 3, 3, 3]           conv1's weights, to draw its filters
=================  ======================  ============================================

Dropout (after conv1 and fc3 in training) is the identity at inference, so ``conv1`` is also
exactly what conv2 reads. Only the onnx package is needed (the ``train`` extra); the server
reads the file with onnxruntime alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

LAYERS_FILENAME = "layers.onnx"
# Seed name -> the exported node whose output it is (torch.onnx names nodes by module path).
LAYER_NODES = {
    "conv1": "/act1/Relu",
    "conv2": "/act2/Relu",
    "pool": "/pool2/MaxPool",
    "fc3": "/act3/Relu",
}
FILTERS = "conv1_filters"
FILTERS_INITIALIZER = "conv1.weight"
LOGITS = "logits"
PARITY_ATOL = 1e-5


def add_layer_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are the named layers (``fc4`` = logits) and conv1's filters."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    produced = {node.name: node.output[0] for node in graph.node}
    missing = [n for n in LAYER_NODES.values() if n not in produced]
    if missing or LOGITS not in {o.name for o in graph.output}:
        raise ValueError(f"not the seed model's graph: nodes {missing} or output {LOGITS!r} missing")
    if FILTERS_INITIALIZER not in {i.name for i in graph.initializer}:
        raise ValueError(f"not the seed model's graph: no initializer {FILTERS_INITIALIZER!r}")
    del graph.output[:]
    sources = {**{name: produced[node] for name, node in LAYER_NODES.items()}, "fc4": LOGITS}
    for name, source in sources.items():
        graph.node.append(helper.make_node("Identity", [source], [name], name=f"/layers/{name}"))
        graph.output.append(helper.make_empty_tensor_value_info(name))
    graph.node.append(helper.make_node("Identity", [FILTERS_INITIALIZER], [FILTERS], name=f"/layers/{FILTERS}"))
    graph.output.append(helper.make_empty_tensor_value_info(FILTERS))
    inferred = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(inferred, full_check=True)
    return inferred


def check_parity(model_path: Path, layers_path: Path, n: int = 64) -> float:
    """Max |logits - fc4| over seeded noise images; raises when they differ (the companion must
    describe exactly the served computation)."""
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(0, 1, (n, 3, 32, 32)).astype(np.float32)
    served = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    layers = ort.InferenceSession(str(layers_path), providers=["CPUExecutionProvider"])
    logits = served.run([LOGITS], {served.get_inputs()[0].name: x})[0]
    fc4 = layers.run(["fc4"], {layers.get_inputs()[0].name: x})[0]
    diff = float(np.abs(logits - fc4).max())
    if diff > PARITY_ATOL or not (logits.argmax(1) == fc4.argmax(1)).all():
        raise ValueError(f"{layers_path}: fc4 differs from {model_path}'s logits by {diff:.2e}")
    return diff


def write_companion(model_path: str | Path, output: str | Path | None = None) -> Path:
    """Write ``layers.onnx`` beside ``model_path`` (or at ``output``) and check it against the served logits."""
    model_path = Path(model_path)
    output = Path(output) if output else model_path.with_name(LAYERS_FILENAME)
    proto = add_layer_outputs(onnx.load(str(model_path)))
    tmp = output.with_name(output.name + ".tmp")
    onnx.save(proto, str(tmp))
    try:
        diff = check_parity(model_path, tmp)
    except Exception:
        tmp.unlink()
        raise
    tmp.replace(output)
    print(f"wrote {output} (fc4 vs served logits: max diff {diff:.1e})")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write layers.onnx beside a served model.onnx.")
    parser.add_argument("model", help="path of the served model.onnx")
    parser.add_argument("--output", help="where to write (default: layers.onnx beside the model)")
    args = parser.parse_args(argv)
    write_companion(args.model, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
