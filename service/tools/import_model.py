"""``cnnserve import-model``: make any ONNX image classifier servable.

Adds the metadata the server reads (``labels``, ``preprocessing``: docs/models.md) to a copy of the
model, makes its batch dimension dynamic when it is fixed (the server batches requests), checks
it with ``onnx.checker``, loads it with the server's own loader and runs a batch through ONNX
Runtime, and only then writes it to ``<repository>/<name>/<version>/model.onnx``.

ONNX Runtime reads ONNX models but cannot write them, so this command needs the ``onnx`` package
(``pip install 'cnnserve[onnx]'``; also in the ``train`` extra). It is imported only here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.inference.repository import MODEL_FILENAME, ModelSpec

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from service.inference.preprocess import Preprocessing

IMAGENET_MEAN = "0.485,0.456,0.406"
IMAGENET_STD = "0.229,0.224,0.225"


class ModelImportError(ValueError):
    """The model or the options cannot make a servable model; the message says why."""


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ModelImportError(f"{what} must be three comma-separated numbers, got {text!r}") from None
    if len(values) != 3:
        raise ModelImportError(f"{what} must be three comma-separated numbers (one per channel), got {text!r}")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """``32`` → (32, 32); ``224x160`` → (224, 160) as height x width."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ModelImportError(f"--input-size must be N or HxW in pixels, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or min(values) <= 0:
        raise ModelImportError(f"--input-size must be N or HxW in pixels, got {text!r}")
    return values[0], values[1]


def parse_scale(text: str) -> float:
    """``1/255`` or a number."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ModelImportError(f"--scale must be a number or a fraction such as 1/255, got {text!r}") from None


def read_labels(path: Path) -> list[str]:
    """One label per line, in class-index order; blank lines at the end are ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ModelImportError(f"cannot read labels file {path}: {e.strerror}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = [line.strip() for line in lines]
    if not labels or any(not label for label in labels):
        raise ModelImportError(f"{path}: needs one non-empty label per line, in class-index order")
    return labels


def _dims(value_info: Any) -> list[int | str | None]:  # an onnx.ValueInfoProto (onnx is optional)
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim
    ]


def add_metadata(
    model: onnx.ModelProto, labels: list[str], pre: Preprocessing, size_given: bool
) -> tuple[onnx.ModelProto, Preprocessing]:
    """The model with our metadata and a dynamic batch dimension; the preprocessing with the
    graph's own input size when ``size_given`` is false. Raises ModelImportError when the graph is
    not an image classifier this server can run."""
    from service.inference.preprocess import Preprocessing

    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelImportError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); it needs one image input"
        )
    inp = inputs[0]
    dims = _dims(inp)
    if len(dims) != 4 or dims[1] not in (3, None):
        raise ModelImportError(f"the model's input {inp.name!r} is {dims}; an image classifier takes [N,3,H,W] (NCHW)")
    graph_size = (dims[2], dims[3]) if isinstance(dims[2], int) and isinstance(dims[3], int) else None
    if graph_size and size_given and graph_size != pre.size:
        raise ModelImportError(f"--input-size {pre.size[0]}x{pre.size[1]} does not match the model's input {dims}")
    if graph_size and not size_given:
        pre = Preprocessing(pre.mean, pre.std, pre.scale, graph_size, pre.color)
    elif not graph_size and not size_given:
        raise ModelImportError(f"the model's input {dims} leaves the image size open: give --input-size")
    output = graph.output[0]
    out_dims = _dims(output)
    if out_dims and isinstance(out_dims[-1], int) and out_dims[-1] != len(labels):
        raise ModelImportError(
            f"the model's output {output.name!r} has {out_dims[-1]} classes but the labels file {len(labels)}"
        )
    for tensor in (inp, *graph.output):  # the server batches: the first dimension must be dynamic
        shape = tensor.type.tensor_type.shape
        if len(shape.dim) and shape.dim[0].HasField("dim_value"):
            shape.dim[0].dim_param = "N"
    del model.metadata_props[:]  # ours replace any earlier import's
    model.metadata_props.add(key="labels", value=json.dumps(labels))
    model.metadata_props.add(key="preprocessing", value=json.dumps(pre.to_metadata()))
    return model, pre


def validate(path: Path, name: str, version: str) -> tuple[list[int], np.ndarray]:
    """Load the file with the server's own loader (CPU) and run a batch of two images through it.
    Returns the input shape and the probabilities of the batch."""
    import numpy as np

    from service.inference.runtime import ModelRuntime
    from service.settings import Settings

    runtime = ModelRuntime(ModelSpec(name, version, path), Settings(providers=["cpu"], intra_op_threads=1))
    h, w = runtime.image_size
    images = np.random.default_rng(0).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
    out = runtime.run_batch([images])
    if out.logits.shape != (2, runtime.num_classes) or not np.isfinite(out.logits).all():
        raise ModelImportError(
            f"a batch of 2 images gave outputs of shape {list(out.logits.shape)}, not [2,{runtime.num_classes}]"
        )
    return runtime.input_shape, out.logits


def import_model(args: argparse.Namespace) -> Path:
    import numpy as np

    from service.inference.preprocess import Preprocessing

    try:
        import onnx
    except ImportError:
        raise ModelImportError(
            "import-model needs the onnx package (ONNX Runtime cannot write models): pip install 'cnnserve[onnx]'"
        ) from None
    source = Path(args.model)
    if not args.version.isdigit() or int(args.version) <= 0:
        raise ModelImportError(f"--version must be a positive integer, got {args.version!r}")
    target: Path = Path(args.repository).resolve() / args.name / args.version / MODEL_FILENAME
    if target.exists() and not args.force:
        raise ModelImportError(f"{target} exists; --force replaces it")
    labels = read_labels(Path(args.labels))
    size_given = args.input_size is not None
    try:
        pre = Preprocessing(
            mean=_floats(args.mean, "--mean"),
            std=_floats(args.std, "--std"),
            scale=parse_scale(args.scale),
            size=parse_size(args.input_size) if size_given else (1, 1),
            color=args.channel_order.upper(),
        )
    except ValueError as e:
        raise ModelImportError(str(e)) from None
    try:
        model = onnx.load(str(source))
    except Exception as e:  # onnx raises DecodeError, OSError, ... for unreadable files
        raise ModelImportError(f"cannot read {source.resolve()} as an ONNX model: {type(e).__name__}: {e}") from None
    model, pre = add_metadata(model, labels, pre, size_given)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ModelImportError(f"onnx.checker refuses the model: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / MODEL_FILENAME
        onnx.save(model, str(staged))
        try:
            input_shape, logits = validate(staged, args.name, args.version)
        except ValueError as e:
            raise ModelImportError(str(e)) from None
        except Exception as e:  # ONNX Runtime's own errors (unsupported operator, bad graph)
            raise ModelImportError(f"ONNX Runtime cannot run the model: {type(e).__name__}: {e}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staged, target)
    print(
        f"imported {args.name}/{args.version} to {target}: input {input_shape} ({pre.color}), {len(labels)} labels, "
        f"a test batch ran through ONNX Runtime"
    )
    if np.all(logits >= 0) and np.allclose(logits.sum(1), 1, atol=1e-3):
        print(
            "note: the model's output already sums to 1; the server applies softmax to it, so its reported "
            "probabilities will be flatter (the ranking is unchanged). Export the scores before softmax if you can.",
        )
    print(f"serve it: cnnserve serve --model-repository {target.parent.parent.parent}")
    return target


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the ONNX image classifier (input [N,3,H,W] float32, output [N,classes] scores)")
    p.add_argument("--labels", required=True, help="text file, one label per line in class-index order")
    p.add_argument("--name", required=True, help="model name in the repository (what requests ask for)")
    p.add_argument("--version", default="1", help="model version, a positive integer (default 1)")
    p.add_argument("--repository", default="models", help="model repository folder (default models)")
    p.add_argument(
        "--input-size", default=None, help="N or HxW in pixels (default: the model's own input size, when fixed)"
    )
    p.add_argument(
        "--mean",
        required=True,
        help=f"per-channel mean after scaling, comma-separated in channel order (ImageNet: {IMAGENET_MEAN})",
    )
    p.add_argument("--std", required=True, help=f"per-channel std after scaling (ImageNet: {IMAGENET_STD})")
    p.add_argument("--scale", default="1/255", help="pixel values are multiplied by this first (default 1/255)")
    p.add_argument(
        "--channel-order",
        default="rgb",
        choices=["rgb", "bgr"],  # service.inference.preprocess.COLORS; literal, so building the parser needs no numpy
        help="channel order the model expects (default rgb; OpenCV-trained models often bgr)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing model file")


def main(args: argparse.Namespace) -> int:
    try:
        import_model(args)
    except ModelImportError as e:
        print(f"cnnserve import-model: {e}", file=sys.stderr)
        return 1
    return 0
