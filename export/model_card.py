"""Write the model card (models/<name>/README.md) from a training run and an evaluation.

    python -m export.model_card --run runs/cifar10 --model models/cifar10/1/model.onnx \
        --evaluation models/cifar10/evaluation.json

Copies the run's curves.png next to the card; every figure in the card comes from those files.
The card's "Precision variants" section comes from the variant files beside the model, their
``evaluation.<precision>.json`` (``cnnserve quantize --out-dir``) and, for speeds, a
``bench/ceiling.py --precision`` result (``--speeds``). ``--variants-only`` rewrites just that
section of an existing card (no training run needed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
from pathlib import Path

from export.quantize import sha256_of
from service.inference.repository import PRECISIONS, variant_filename

VARIANTS_HEADING = "## Precision variants"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )


def _metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def cpu_words(cpu: dict | None) -> str:
    """``AMD EPYC 7B12: AVX2, FMA; no VNNI`` from a ``cpu_features()`` record."""
    if not cpu:
        return "CPU not recorded"
    flags = [f.upper().replace("_", "-") for f in cpu.get("flags", []) if f not in ("sse4_1", "avx", "asimd")]
    vnni = "; no VNNI" if cpu.get("u8s8_can_saturate") else ""
    return f"{cpu.get('model') or cpu.get('arch')}: {', '.join(flags) or 'no listed flags'}{vnni}"


def render_recipes(recipes: dict) -> str:
    """The INT8 recipes measured by ``python -m export.quantize`` (export.quantize.compare_recipes)."""
    sizes = list(recipes["timing"]["median_ms"]["fp32"])
    lines = [
        "| recipe | top-1 here | agreement here | check inputs here | top-1, exact arithmetic | "
        "agreement, exact arithmetic | " + " | ".join(f"speed-up batch {n}" for n in sizes) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(sizes),
    ]
    for r in recipes["candidates"]:
        lines.append(
            f"| `{r['recipe']}`: {r['description']} | {100 * r['top1']:.2f} % | {100 * r['agreement']:.2f} % | "
            f"{100 * r['check_inputs_agreement']:.1f} % | {100 * r['exact_arithmetic_top1']:.2f} % | "
            f"{100 * r['exact_arithmetic_agreement']:.2f} % | "
            + " | ".join(f"{r['speedup'][str(n)]:.2f}x" for n in sizes)
            + " |"
        )
    t = recipes["timing"]
    by = {r["recipe"]: r for r in recipes["candidates"]}

    def fig(name: str, key: str) -> str:
        return f"{100 * by[name][key]:.2f} %" if name in by else "?"

    why = (
        "\n\nWhy `u8s8-rr`: two candidates are within the 0.5-point margin, at least 99 % in agreement with "
        "FP32 and unable to saturate on any x86-64 CPU whatever the input: `u8s8-rr` (7-bit weights bound every "
        "`vpmaddubsw` pair sum below 32,767) and `u8u8`; of the two, `u8s8-rr` runs the same U8S8 kernels as "
        "8-bit weights, so VNNI CPUs keep their `vpdpbusd` speed. The others: `u8s8` (the previous shipped recipe) "
        f"is exact where the CPU has VNNI ({fig('u8s8', 'exact_arithmetic_top1')}) and "
        f"{fig('u8s8', 'top1')} here; `s8s8` gives the very same answers, because ONNX Runtime's x86 CPU "
        "provider converts int8 activations to uint8 and runs the same U8S8 kernels; `u8u8` is as accurate "
        f"({fig('u8u8', 'top1')}, {fig('u8u8', 'agreement')} agreement) but its kernels widen to 16 bits "
        "and have no VNNI form, slower at batch 64 here and forgoing VNNI elsewhere; per-tensor 8-bit weights "
        f"(`u8s8-pt`) still saturate now and then ({fig('u8s8-pt', 'agreement')} agreement here against "
        f"{fig('u8s8-pt', 'exact_arithmetic_agreement')} exact); per-tensor 7-bit (`u8s8-rr-pt`) and "
        "quantizing the logits layer (`+fc4`) cost agreement (below 99 %). Where the saturation happens: "
        "7-bit weights in conv1 alone (its inputs are the normalised image, spread over the whole uint8 "
        "range) gave 78.88 % and 99.36 % agreement here, the same as exact arithmetic, but conv2 and fc3 "
        "would keep 8-bit weights that *can* saturate on inputs unlike the validation images; the 0.24 "
        "points were not worth a recipe that is safe only by measurement. Per CPU feature set: on x86-64 "
        "with AVX2 and no VNNI (measured, this machine) `u8s8-rr` gives the figures above and `auto` picks "
        "INT8 where it is faster; with AVX-512 VNNI, AVX-VNNI or AMX, and on ARM64 (`asimddp`, `i8mm`), the "
        "integer sums are exact, so the exact-arithmetic column is what they compute (emulated, not measured "
        "on such a CPU; their speed is not measured)."
    )
    return (
        f"INT8 recipes measured on {cpu_words(recipes['cpu'])} (`{recipes['command']}`; onnxruntime "
        f"{recipes['onnxruntime']}; {recipes['images']} validation images, FP32 {100 * recipes['fp32_top1']:.2f} %; "
        f"`+fc4`: the logits layer quantized too; speed-ups over FP32 at {t['intra_op_threads']} intra-op thread, "
        f"medians of {t['rounds']} interleaved rounds on the shared 2-core machine). *Here* is what this AVX2 CPU "
        "computes; *exact arithmetic* is the same graph run unfused (ONNX Runtime dequantizes and computes in FP32 "
        "instead of running its integer kernels), which is what a CPU whose integer kernels cannot saturate "
        "(AVX-512 VNNI, AVX-VNNI, AMX, ARM64 dot products) computes, up to rounding: emulated here, not measured "
        "on such a CPU.\n\n" + "\n".join(lines) + why
    )


def render_variants(model: Path, card_dir: Path, speeds: dict | None = None, recipes: dict | None = None) -> str:
    """The "Precision variants" section: every variant file beside ``model`` with its size,
    sha256, validation top-1 (overall and per class, from card_dir/evaluation[.<p>].json) and the
    CPU it was measured on, how it was made, the INT8 recipes compared (``recipes``: an
    ``export.quantize`` comparison), and the in-process speeds of a ``bench/ceiling.py
    --precision`` result."""
    present = [p for p in PRECISIONS if model.with_name(variant_filename(p)).is_file()]
    evaluations = {
        p: json.loads((card_dir / ("evaluation.json" if p == "fp32" else f"evaluation.{p}.json")).read_text())
        for p in present
    }
    base = evaluations["fp32"]["top1"]
    rows = []
    for p in present:
        path = model.with_name(variant_filename(p))
        e = evaluations[p]
        delta = "—" if p == "fp32" else f"{100 * (e['top1'] - base):+.2f} pp"
        agree = "—" if p == "fp32" else f"{100 * e['top1_agreement_with_fp32']:.2f} %"
        on = "—" if p == "fp32" else cpu_words((e.get("measured_on") or {}).get("cpu"))
        rows.append(
            f"| {p} | `{os.path.relpath(path, card_dir)}` | {path.stat().st_size / 1e6:.1f} MB | "
            f"**{100 * e['top1']:.2f} %** | {delta} | {agree} | {on} | `{sha256_of(path)}` |"
        )
    classes = evaluations["fp32"]["classes"]
    per_class = "\n".join(
        f"| {c} | " + " | ".join(f"{100 * evaluations[p]['per_class'][c]:.1f} %" for p in present) + " |"
        for c in classes
    )
    how = []
    if "int8" in present:
        q = json.loads(_metadata(model.with_name(variant_filename("int8")))["quantization"])
        cal = q["calibration"]
        check = evaluations["int8"].get("check") or {}
        how.append(
            f"- **int8** (for the CPU; recipe `{q.get('recipe', 'u8s8')}`): {q['tool']}; {q['format']} format, "
            f"weights {q['weights']}, activations {q['activations']}, calibrated on {cal['images']} training images "
            f"drawn with seed {cal['seed']} (`{cal['selection']}`; sha256 of the index list "
            f"`{cal['index_sha256'][:16]}…`) from the training split, never the validation split. Kept FP32: "
            f"{', '.join(q['kept_fp32']) or 'nothing'} (the layer that produces the logits: quantizing its input "
            "moved most of the answers that changed, and keeping it costs no measurable speed). Why 7-bit weights: "
            "ONNX Runtime's U8S8 kernels on x86 CPUs without VNNI (AVX2; AVX-512 before Cascade Lake) multiply "
            "with `vpmaddubsw`, which adds two uint8 × int8 products into a saturating int16: 2 × 255 × 127 = "
            "64,770 overflows 32,767, 2 × 255 × 64 = 32,640 cannot, whatever the input. VNNI (`vpdpbusd`), AMX "
            "and ARM64 (`sdot`/`udot`, `smmla`) sum in 32 bits and are exact either way, so there the recipe only "
            "costs weight resolution, and it runs the same kernels at the same speed as 8-bit weights. Written "
            "only because its validation top-1 is within "
            f"{evaluations['int8'].get('max_accuracy_drop_pp', 0.5):g} points of FP32's (`--max-accuracy-drop`) "
            f"and it agrees with FP32 on {100 * check.get('agreement', float('nan')):.1f} % of the "
            f"{check.get('images', '?')} check inputs (`1/check_inputs.npz`, the server's check at load needs "
            f"{100 * check.get('threshold', float('nan')):g} %)."
        )
    if "fp16" in present:
        q = json.loads(_metadata(model.with_name(variant_filename("fp16")))["quantization"])
        parity = evaluations["fp16"].get("fp16_parity") or {}
        how.append(
            f"- **fp16** (for CUDA): {q['tool']}, `keep_io_types=True` (input and output stay FP32). Parity "
            f"with FP32 on {parity.get('images', 512)} validation images (CPU provider): max |logit difference| "
            f"{parity.get('max_abs_logit_diff', float('nan')):.1e}, identical top-1. ONNX Runtime's x86 CPU "
            "provider computes it in FP32 with the FP16-rounded weights (no FP16 kernels), so that check and the "
            "accuracy above cover the rounding of the weights, and it is no faster than FP32 there; FP16 arithmetic "
            "on CUDA is checked by `scripts/gpu-check.sh` (tests/test_gpu.py)."
        )
    speed = "Not measured yet: `python bench/ceiling.py --precision fp32,int8 --threads 1,2 --batch-sizes 1,64`."
    if speeds and speeds.get("speedups"):
        m = speeds["machine"]
        lines = [
            "| variant | intra-op threads | batch | fp32 ms per run | variant ms per run | speed-up |",
            "|---|---|---|---|---|---|",
        ]
        for r in speeds["speedups"]:
            t = "default" if r["threads"] == 0 else r["threads"]
            lines.append(
                f"| {r['precision']} | {t} | {r['batch_size']} | {r['fp32_ms']:.3f} | {r['ms']:.3f} | "
                f"**{r['speedup']:.2f}x** |"
            )
        speed = (
            f"ONNX Runtime alone, in process (`{speeds['command']}`; {m['cpu_model']}, {m['cpu_count']} cores, "
            f"onnxruntime {m['onnxruntime']}, load average {m.get('load_average', '?')} at the start, "
            f"{speeds['config']['rounds']} interleaved rounds, medians):\n\n" + "\n".join(lines)
        )
    header = " | ".join(present)
    compared = render_recipes(recipes) if recipes else ""
    return f"""{VARIANTS_HEADING}

The same model at other numeric precisions, beside `model.onnx` in the version folder. The
server's `precision` setting picks the file. Every variant takes and answers FP32 tensors. An
INT8 model's answers depend on the CPU's integer kernels, so every variant figure below names
the CPU features it was measured on, and the server checks the variant where it runs: at every
load it runs the variant and FP32 side by side on the 256 check inputs beside the model
(`1/check_inputs.npz`: synthetic 1/f-noise and shape images with a fixed seed, export/check_inputs.py) and serves FP32 instead
(`auto`) or refuses to start (the variant asked for) when their top-1 answers agree on fewer
than 95 % of them. `auto`, the default, considers int8 on the CPU provider (nothing on CUDA)
and takes it only where it passes that check *and* is faster than FP32 at batch 1 and
`max_batch_size` in a short timing at load (see the project README's "Precision").

| precision | file | size | validation top-1 | vs fp32 | top-1 agreement with fp32 | measured on | sha256 |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

| class | {header} |
|---|{"---|" * len(present)}
{per_class}

{chr(10).join(how)}

{compared}

{speed}

```console
$ cnnserve quantize --model models/cifar10/1/model.onnx --out-dir models/cifar10
$ python -m export.quantize --with-output-layer --batch-sizes 1,8,64 --json bench/results/int8-recipes.json
$ python -m export.model_card --variants-only --model models/cifar10/1/model.onnx \\
      --speeds bench/results/ceiling-precision.json --recipes bench/results/int8-recipes.json
```
"""


def replace_variants_section(card: str, section: str) -> str:
    """``card`` with its variants section replaced by ``section`` (inserted before "## Reproduce"
    when it has none)."""
    start = card.find(VARIANTS_HEADING + "\n")
    if start >= 0:
        end = card.find("\n## ", start + len(VARIANTS_HEADING))
        return card[:start] + section.rstrip("\n") + ("\n" + card[end:] if end >= 0 else "\n")
    at = card.find("## Reproduce")
    if at < 0:
        return card.rstrip("\n") + "\n\n" + section
    return card[:at] + section + "\n" + card[at:]


def render(run: Path, model: Path, evaluation: dict, card_dir: Path, train_machine: str) -> str:
    history = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    best = max(history, key=lambda h: max(h["val_acc"], h["val_acc_ema"]))
    minutes = history[-1]["elapsed_s"] / 60
    per_class = "\n".join(f"| {c} | {100 * a:.1f} % |" for c, a in evaluation["per_class"].items())
    top1 = 100 * evaluation["top1"]
    rel_model = os.path.relpath(model, card_dir)
    wd, ls = cfg.get("weight_decay", 5e-4), cfg.get("label_smoothing", 0.1)
    regularisation = f"weight decay {wd:g} on weights (not\n  biases); " + (
        f"label smoothing {ls:g}." if ls else "no label smoothing."
    )
    # The flags that differ from `cnnserve train`'s defaults, so the command reproduces this run.
    flags = "".join(
        f" --{name.replace('_', '-')} {cfg[name]:g}"
        for name, default in (("batch_size", 128), ("lr", 0.05), ("weight_decay", 5e-4), ("label_smoothing", 0.1))
        if name in cfg and cfg[name] != default
    )
    return f"""# cifar10 — model card

A CIFAR-10 classifier of the project's fixed architecture (conv 3→32, conv 32→32, max-pool,
FC 8192→512, FC 512→10; ReLU; dropout 0.3 and 0.5 in training only; 4,210,090 parameters),
exported to ONNX for cnnserve.

Validation top-1: **{top1:.2f} %** ({evaluation["images"]} held-out images)

| | |
|---|---|
| File | `{rel_model}` (ONNX opset 17, input `input` FP32 [N,3,32,32], output `logits` FP32 [N,10]) |
| sha256 | `{sha256_of(model)}` |
| Labels | {", ".join(evaluation["classes"])} (index order) |
| Preprocessing | RGB, /255, per-channel mean/std of the training split (stored in the ONNX metadata) |
| Training | {len(history)} epochs, {minutes:.0f} min on {train_machine} |
| Best epoch | {best["epoch"]} ({"EMA" if best["val_acc_ema"] >= best["val_acc"] else "raw"} weights) |

## Data

The 50,000 CIFAR-10 training images as JPEG (quality 75, re-encoded by a public mirror;
`../shared/data/cifar10/cifar10-train-jpeg.tar.gz`). A stratified 5,000-image validation split
(500 per class, seed 0) is held out; the model is trained on the other 45,000. The official test
split is not available here, so every figure is on the validation split; because the best epoch
is picked on it, the figure is slightly optimistic for unseen data.

## Recipe, and why

Chosen for a 2-conv-layer network without normalisation layers, trained on 2 CPU cores in under
an hour:

- **Augmentation**: random 32×32 crops of 4-pixel reflect-padded images and horizontal flips, done
  on whole batches in torch (no DataLoader workers fighting for 2 cores). The network's 4.2 M
  parameters sit almost all in the 8192→512 layer, which overfits without it.
- **Optimiser**: SGD, Nesterov momentum 0.9, batch {cfg.get("batch_size", 128)}, peak learning rate {cfg.get("lr", 0.05)}, warm-up over
  the first 15 % of steps then cosine decay to 0 ("one cycle"); {regularisation}
- **Weight averaging**: an exponential moving average of the weights (decay 0.999) is evaluated
  every epoch; it is consistently 1–4 points better than the raw weights mid-training and the
  checkpoint with the best validation accuracy (raw or EMA) is exported.

## Results on the validation split

| class | accuracy |
|---|---|
{per_class}

![confusion matrix](confusion_matrix.png)

![training curves](curves.png)

## Reproduce

```console
$ pip install -e '.[train]'
$ cnnserve train --data ../shared/data/cifar10/cifar10-train-jpeg.tar.gz --epochs {len(history)}{flags} --out-dir runs/cifar10
$ cnnserve export --checkpoint runs/cifar10/best.pt --output models/cifar10/1/model.onnx
$ cnnserve evaluate --model models/cifar10/1/model.onnx --out-dir models/cifar10
$ python -m export.model_card --run runs/cifar10 --model models/cifar10/1/model.onnx \\
      --evaluation models/cifar10/evaluation.json --notes models/cifar10/notes.md
```

Training is seeded (data split, initialisation, augmentation, shuffling); on another CPU or
torch build the figures can differ in the last decimal places. `cnnserve evaluate` needs no
torch: it runs the ONNX file through onnxruntime with the preprocessing from its metadata.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/cifar10"))
    parser.add_argument("--model", type=Path, default=Path("models/cifar10/1/model.onnx"))
    parser.add_argument("--evaluation", type=Path, default=Path("models/cifar10/evaluation.json"))
    parser.add_argument("--machine", default=None, help="where training ran (default: this machine)")
    parser.add_argument("--notes", type=Path, default=None, help="markdown appended to the card (run-specific notes)")
    parser.add_argument("--speeds", type=Path, default=None, help="a bench/ceiling.py --precision result (JSON)")
    parser.add_argument(
        "--recipes", type=Path, default=None, help="a `python -m export.quantize --json` recipe comparison (JSON)"
    )
    parser.add_argument(
        "--variants-only", action="store_true", help="rewrite only the card's precision-variants section"
    )
    args = parser.parse_args()
    card_dir = args.model.parent.parent
    speeds = json.loads(args.speeds.read_text()) if args.speeds else None
    recipes = json.loads(args.recipes.read_text()) if args.recipes else None
    has_variants = any(args.model.with_name(variant_filename(p)).is_file() for p in PRECISIONS if p != "fp32")
    if args.variants_only:
        card = card_dir / "README.md"
        card.write_text(
            replace_variants_section(card.read_text(), render_variants(args.model, card_dir, speeds, recipes))
        )
        print(f"wrote the precision-variants section of {card}")
        return
    shutil.copyfile(args.run / "curves.png", card_dir / "curves.png")
    text = render(args.run, args.model, json.loads(args.evaluation.read_text()), card_dir, args.machine or machine())
    if has_variants:
        text = replace_variants_section(text, render_variants(args.model, card_dir, speeds, recipes))
    if args.notes:
        text += "\n" + args.notes.read_text()
    (card_dir / "README.md").write_text(text)
    print(f"wrote {card_dir / 'README.md'}")


if __name__ == "__main__":
    main()
