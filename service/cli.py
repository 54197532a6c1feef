"""cnnserve: serve image classifiers (ONNX) over gRPC and HTTP, and the tools around them.

Commands: serve, classify, loadtest, import-model, train, export, layers, quantize, evaluate, sync-repository.
`cnnserve COMMAND --help` describes each. train/export/quantize need the `train` extra (torch,
onnxconverter-common), import-model the `onnx` package (also in the `train` extra); each is
imported only when called, so the serving install never loads them.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from service.settings import Settings, explain_error, flag_name

DEFAULT_DATA = "../shared/data/cifar10/cifar10-train-jpeg.tar.gz"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; help shows the description, default and environment variable."""
    group = parser.add_argument_group("server settings (flag, or CNNSERVE_<NAME> environment variable)")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = f"{field.description} [default: {shown}; env CNNSERVE_{name.upper()}]".replace("%", "%%")
        annotation = field.annotation
        if annotation is bool:
            group.add_argument(
                flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("repeatable"):
            # A list flag given once per item (--load-model a --load-model b), as Triton's.
            group.add_argument(flag_name(name), dest=name, action="append", default=None,
                               metavar=name.upper(), help=help_text)  # fmt: skip
            continue
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        # Fields with choices keep argparse's {a,b,c} metavar, so --help lists them.
        group.add_argument(
            flag_name(name),
            dest=name,
            default=None,
            choices=choices,
            metavar=None if choices else name.upper(),
            help=help_text,
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)


#: Commands that run models. ONNX Runtime is a dependency, but an install with --no-deps (the lean
#: CPU-only path of README "Install") can lack it: one line naming both packages, not a traceback.
NEEDS_ONNXRUNTIME = {"serve", "evaluate", "import-model", "quantize", "export"}
NO_ONNXRUNTIME = (
    "ONNX Runtime is not installed: pip install onnxruntime (CPU, any machine) or onnxruntime-gpu "
    "(Linux x86-64, NVIDIA GPU and CUDA 13; it runs on the CPU too), one of them, not both; "
    "from a checkout, pip install -r requirements-cpu.txt installs every dependency with the CPU one"
)


def _has_onnxruntime() -> bool:
    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):  # an import blocked (sys.modules entry None) or broken
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from service import server
    from service.security.setup import Security, SecurityError
    from service.workers import supervisor

    settings = settings_from_args(args)
    try:  # unusable TLS files or keys: one line before any process starts (each reads them again)
        Security(settings)
    except SecurityError as e:
        print(f"cnnserve: {e}", file=sys.stderr)
        return 2
    # The supervisor is handed the server's entry points: the multi-process mode does not import
    # the composition root that imports it (tests/test_layering.py).
    return supervisor.run(settings, server.run, server.frontend_main)


def cmd_classify(args: argparse.Namespace) -> int:
    from service.tools import classify_client

    return classify_client.main(args)


def cmd_train(args: argparse.Namespace) -> int:
    from export.train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data,
        out_dir=args.out_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing=args.label_smoothing,
        seed=args.seed,
        threads=args.threads,
        limit_train=args.limit_train,
        val_size=args.val_size,
    )
    best = train(cfg, resume=not args.no_resume)
    print(f"best checkpoint: {best}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.export_onnx import export
    from export.layers_onnx import write_companion

    output = export(args.checkpoint, args.output, data=args.data, opset=args.opset)
    if not args.no_layers:
        write_companion(output)
    return 0


def cmd_layers(args: argparse.Namespace) -> int:
    from export.layers_onnx import write_companion

    try:
        write_companion(args.model, args.output)
    except (ValueError, OSError) as e:  # another model than the seed's: one line, not a traceback
        print(f"cnnserve layers: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from export.evaluate import main

    try:
        return main(args)
    except (ValueError, OSError) as e:  # a model for other data, or no data: one line, not a traceback
        print(f"cnnserve evaluate: {e}", file=sys.stderr)
        return 1


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest.command import main

    return main(args)


def cmd_quantize(args: argparse.Namespace) -> int:
    from export.quantize import main

    return main(args)


def cmd_sync_repository(args: argparse.Namespace) -> int:
    from service.model_control.sync import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from service import __version__

    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="run the gRPC + HTTP server",
        description="Serve the models of a model repository over gRPC and HTTP.",
    )
    add_settings_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("classify", help="classify image files with a running server")
    p.add_argument("images", nargs="+", type=Path, help="JPEG/PNG files")
    p.add_argument(
        "--target",
        default=None,
        help="host:port of the server (default localhost:8001 for gRPC, localhost:8000 with --http)",
    )
    p.add_argument("--http", action="store_true", help="use HTTP /predict instead of gRPC Classify")
    p.add_argument("--top-k", type=int, default=None, help="labels per image, 1-10 (server default 5)")
    p.add_argument("--model", default=None, help="model name (default: the server's default)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before giving up (default 10)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    from service.security import client as security_client

    security_client.add_arguments(p.add_argument_group("TLS and access key"))
    p.set_defaults(func=cmd_classify)

    from service.tools import import_model

    p = sub.add_parser(
        "import-model",
        help="add cnnserve's metadata to any ONNX image classifier and put it in a model repository (needs onnx)",
        description=import_model.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    import_model.add_arguments(p)
    p.set_defaults(func=import_model.main)

    p = sub.add_parser("train", help="train the CNN on CIFAR-10 (needs the train extra)")
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"image-folder tree/.tar.gz or CIFAR-10 python archive (default {DEFAULT_DATA})",
    )
    p.add_argument("--out-dir", default="runs/cifar10", help="checkpoints, metrics.jsonl, curves.png")
    p.add_argument("--epochs", type=int, default=65, help="passes over the training split (default 65)")
    p.add_argument("--batch-size", type=int, default=128, help="images per training step (default 128)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="on weights, not biases (default 5e-4)")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and augmentation (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--val-size", type=int, default=5000, help="held-out stratified validation images")
    p.add_argument("--limit-train", type=int, default=0, help="train on N images only (smoke runs)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt in --out-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX with parity check (needs the train extra)")
    p.add_argument("--checkpoint", default="runs/cifar10/best.pt", help="the training checkpoint (default %(default)s)")
    p.add_argument("--output", default="models/cifar10/1/model.onnx", help="ONNX file to write (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="images for the parity check (validation split)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--no-layers", action="store_true", help="do not write the companion layers.onnx (used by /explain)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "layers",
        help="write layers.onnx (intermediate activations, for /explain) beside a model.onnx (needs the train extra)",
    )
    p.add_argument("--model", default="models/cifar10/1/model.onnx", help="the model.onnx (default %(default)s)")
    p.add_argument("--output", default=None, help="default: layers.onnx beside the model")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("evaluate", help="accuracy of an ONNX model through onnxruntime (no torch)")
    p.add_argument("--model", default="models/cifar10/1/model.onnx", help="the ONNX model (default %(default)s)")
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 image-folder tree/.tar.gz or python archive")
    p.add_argument(
        "--split",
        default="val",
        choices=["val", "train", "all", "test"],
        help="val: the held-out 5,000 (default); test: a CIFAR-10 python archive's test batch",
    )
    p.add_argument("--out-dir", default=None, help="write confusion_matrix.png and evaluation.json here")
    p.add_argument("--batch-size", type=int, default=500, help="images per ONNX Runtime call (default 500)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "quantize",
        help="write INT8 (CPU) and FP16 (CUDA) variants of an ONNX model, each checked on the validation split",
        description="Write model.int8.onnx / model.fp16.onnx beside --model, each refused (not written) when its "
        "validation top-1 falls more than --max-accuracy-drop points below the FP32 model's.",
    )
    p.add_argument("--model", default="models/cifar10/1/model.onnx", help="the FP32 model")
    p.add_argument("--data", default=DEFAULT_DATA, help="training images calibrate (INT8); the validation split checks")
    p.add_argument("--precision", default="int8,fp16", help="comma-separated variants: int8, fp16 (default both)")
    p.add_argument("--calibration-images", type=int, default=512, help="training images that calibrate INT8 (512)")
    p.add_argument("--calibration-seed", type=int, default=0, help="seed that draws them (default 0)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.5,
        help="most percentage points of validation top-1 a variant may lose against FP32 (default 0.5)",
    )
    p.add_argument(
        "--quantize-output-layer",
        action="store_true",
        help="also quantize the layer that produces the logits (default: kept FP32, which keeps top-1 "
        "agreement with FP32 above 99 %% at no measurable cost)",
    )
    p.add_argument(
        "--recipe",
        default="u8s8-rr",
        choices=["u8s8-rr", "u8s8", "u8u8", "s8s8", "u8s8-pt", "u8s8-rr-pt"],
        help="INT8 recipe (export/quantize.py INT8_RECIPES). u8s8-rr (default): uint8 activations, int8 weights "
        "in 7 bits per output channel, which cannot saturate ONNX Runtime's x86 kernels on CPUs without VNNI; "
        "u8s8: the same in 8 bits, which saturates there",
    )
    p.add_argument("--out-dir", default=None, help="write evaluation.<precision>.json here (the model card's figures)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "sync-repository",
        help="publish model versions into a polled repository (write, then rename)",
        description="Publish new model versions into a repository a --model-control-mode poll server reads.",
    )
    from service.model_control.sync import add_arguments as add_sync_arguments

    add_sync_arguments(p)
    p.set_defaults(func=cmd_sync_repository)

    p = sub.add_parser("loadtest", help="load-test a running server: throughput, latency, batching")
    # Only the flag definitions (argparse and dataclasses): the load generator itself, with numpy,
    # grpc.aio and httptools, is imported when the command runs.
    from loadtest.arguments import add_arguments as add_loadtest_arguments

    add_loadtest_arguments(p)
    p.set_defaults(func=cmd_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in NEEDS_ONNXRUNTIME and not _has_onnxruntime():
        print(f"cnnserve {args.command}: {NO_ONNXRUNTIME}", file=sys.stderr)
        return 2
    try:
        code: int = args.func(args)
        return code
    except ValidationError as e:
        given = {name for name in Settings.model_fields if getattr(args, name, None) is not None}
        print(f"cnnserve: invalid settings:\n{explain_error(e, given)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
