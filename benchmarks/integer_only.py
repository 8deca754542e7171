"""Integer-only DeiT-tiny (I-ViT-style kernels) vs the fake-quant model and float, plus what is integer per method.

Part 1: for each method of ``--methods`` and each seed, quantize at W8A8 on 32 calibration images (with
``--deploy`` when given), compile the integer runtime (`vitq.export.integer_vit`, its two own scales calibrated
on the same 32 images) and evaluate float, fake-quant and integer-only on the seed's evaluation images (the first
``--images`` of them).
Part 2: for every method in ``--ops-methods`` at W8A8 (seed 0; ``METHOD@TARGET`` quantizes with ``--deploy
TARGET``): how many quantization points the ONNX export keeps as integer QDQ / int8 weights vs float paths (and
why), and whether the integer runtime accepts it.

    python benchmarks/integer_only.py --seeds 0 --out benchmarks/results/integer_only.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from common import comma_list, deit_tiny_split, report_header, write_report

import vitq
from vitq.calib.runner import run_batched
from vitq.errors import VitqError
from vitq.export.integer_vit import IntegerViT
from vitq.export.onnx import export_onnx
from vitq.report.tables import markdown_table


def predictions(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return run_batched(lambda chunk: model(chunk).argmax(1), images, batch_size)


def accuracy_rows(method: str, deploy: str | None, seeds: list[int], n_images: int) -> list[list]:
    rows = []
    for seed in seeds:
        model, calib, (images, labels) = deit_tiny_split(32, seed, n_images)
        qmodel = vitq.quantize(model, vitq.QuantConfig(method=method, w_bits=8, a_bits=8, seed=seed, deploy=deploy),
                               calib, progress=False)
        runtime = IntegerViT.compile(qmodel, calib)
        start = time.perf_counter()
        integer = predictions(runtime, images)
        seconds = time.perf_counter() - start
        fake_quant = predictions(qmodel, images)
        with qmodel.quantization_disabled():
            float_ = predictions(qmodel, images)
        top1 = {name: 100 * (p == labels).float().mean().item()
                for name, p in (("float", float_), ("fake", fake_quant), ("int", integer))}
        rows.append([method, seed, len(images), f"{top1['float']:.2f}", f"{top1['fake']:.2f}", f"{top1['int']:.2f}",
                     f"{top1['int'] - top1['float']:+.2f}", f"{top1['int'] - top1['fake']:+.2f}",
                     f"{100 * (integer == fake_quant).float().mean():.1f}", f"{seconds / len(images) * 1000:.0f}"])
    return rows


def ops_rows(methods: list[str]) -> list[list]:
    model, calib, _ = deit_tiny_split(32, 0, 1)
    rows = []
    for label in methods:
        method, _, deploy = label.partition("@")
        qmodel = vitq.quantize(model, vitq.QuantConfig(method=method, w_bits=8, a_bits=8, deploy=deploy or None),
                               calib, progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            exported = export_onnx(qmodel, Path(tmp) / "m.onnx")
        forms = Counter(p.form for p in exported.points)
        reasons = Counter(f"{p.role}: {p.reason.split(' (')[0].split(';')[0]}" for p in exported.float_points)
        try:
            IntegerViT.compile(qmodel, calib[:4])
            runtime = "yes"
        except VitqError as err:
            runtime = f"no ({str(err).removeprefix('integer runtime: ')[:70]})"
        rows.append([method + (f" --deploy {deploy}" if deploy else ""), forms["int8 weight"],
                     forms["uint8 QDQ"] + forms["uint8 QDQ + clip"],
                     forms["float path"], "; ".join(f"{n}x {r}" for r, n in sorted(reasons.items())) or "—",
                     runtime])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default="percentile")
    parser.add_argument("--deploy", default=None, help="quantize the --methods models for this deployment target")
    parser.add_argument("--seeds", type=comma_list(int), default="0")
    parser.add_argument("--images", type=int, default=10_000, help="evaluation images per seed (default: all)")
    parser.add_argument("--ops-methods", type=comma_list(str), default="minmax,percentile,repq-vit,dopq-vit,gptq,erq")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/integer_only.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    accuracy = [row for method in args.methods for row in accuracy_rows(method, args.deploy, args.seeds, args.images)]
    ops = ops_rows(args.ops_methods)
    write_report(args.out, [
        *report_header(
            "Integer-only DeiT-tiny (W8A8)",
            f"- methods {', '.join(f'`{m}`' for m in args.methods)} W8A8"
            + (f" `--deploy {args.deploy}`" if args.deploy else "")
            + f", 32 calibration images per seed, {accuracy[0][2]} evaluation images",
            "- integer runtime: `vitq.export.integer_vit.IntegerViT` (int64 tensors; Shiftmax, ShiftGELU, "
            "integer LayerNorm with integer square root, dyadic requantization; residual stream 22-bit)"),
        markdown_table(["method", "seed", "images", "float top-1", "fake-quant top-1", "integer-only top-1",
                        "integer − float", "integer − fake-quant", "same class as fake-quant %",
                        "integer ms/image"], accuracy),
        "",
        "## What runs in integers, per method (W8A8, seed 0)",
        "",
        "ONNX export: weights stored as int8 codes, activations as uint8 QDQ (per tensor); other points keep a "
        "float path. LayerNorm, Softmax, GELU and the residual additions are float in the ONNX graph (onnxruntime "
        "fuses the GEMMs into integer kernels); the integer runtime computes them in integers too.",
        "",
        markdown_table(["method", "int8 weights", "uint8 QDQ activations", "float-path points",
                        "why float", "integer-only runtime"], ops),
        "",
    ])


if __name__ == "__main__":
    main()
