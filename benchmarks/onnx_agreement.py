"""Exported ONNX (onnxruntime, integer kernels) vs the fake-quant model it came from, on the evaluation images.

For each seed and method: quantize DeiT-tiny at W8A8 on 32 calibration images, export with ``vitq export``'s
code, and evaluate on the seed's 968 evaluation images (a) the torch fake-quant model in float32, (b) the same
model in float64, (c) the ONNX file in onnxruntime. (b) measures how far float32 rounding alone moves the
fake-quant model's top-1: codes that sit on a rounding boundary flip under any change of float arithmetic, and
ONNX-vs-torch differences are of that kind.

    python benchmarks/onnx_agreement.py --methods percentile,repq-vit --seeds 0,1,2
    python benchmarks/onnx_agreement.py --methods repq-vit,gptq,erq,dopq-vit --deploy onnxruntime \
        --out benchmarks/results/onnx_agreement_deploy.md

``--deploy onnxruntime`` quantizes for onnxruntime's integer kernels (integer zero points): the reparameterized
methods then export every point in an integer form (their non-uniform softmax codes as codes + level lookup).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path

import torch
from common import comma_list, deit_tiny_split, report_header, write_report

import vitq
from vitq.calib.runner import run_batched
from vitq.eval.ort import OrtModel
from vitq.experiment.grammar import parse_bits
from vitq.export.onnx import export_onnx
from vitq.report.tables import markdown_table


def logits_of(model, images: torch.Tensor, batch_size: int = 64, dtype=torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return run_batched(lambda chunk: model(chunk.to(dtype)).float(), images, batch_size)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * (logits.argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default="percentile,repq-vit")
    parser.add_argument("--seeds", type=comma_list(int), default="0,1,2")
    parser.add_argument("--bits", type=comma_list(str), default="W8A8", help="settings, e.g. W8A8,W4A8")
    parser.add_argument("--deploy", default=None, help="quantize for this deployment target (QuantConfig.deploy)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/onnx_agreement.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, gaps, per_setting = [], [], {}
    settings = [(method, bits) for method in args.methods for bits in args.bits]
    for seed in args.seeds:
        model, calib, (images, labels) = deit_tiny_split(32, seed, 10_000)
        for method, bits in settings:
            w_bits, a_bits = parse_bits(bits)
            config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, seed=seed, deploy=args.deploy)
            qmodel = vitq.quantize(model, config, calib, progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                exported = export_onnx(qmodel, Path(tmp) / "model.onnx")
                on_ort = logits_of(OrtModel(exported.path, threads=args.threads), images)
            on_torch = logits_of(qmodel, images)
            on_torch64 = logits_of(copy.deepcopy(qmodel).double(), images, dtype=torch.float64)
            ort_gap, f64_gap = top1(on_ort, labels) - top1(on_torch, labels), \
                top1(on_torch64, labels) - top1(on_torch, labels)
            gaps.append((ort_gap, f64_gap))
            per_setting.setdefault((method, bits), []).append(ort_gap)
            rows.append([
                seed, f"{method} {bits}", f"{len(exported.float_points)}/{len(exported.points)}",
                f"{top1(on_torch, labels):.2f}", f"{top1(on_torch64, labels):.2f}", f"{top1(on_ort, labels):.2f}",
                f"{ort_gap:+.2f}", f"{f64_gap:+.2f}",
                int((on_ort.argmax(1) != on_torch.argmax(1)).sum()),
                int((on_torch64.argmax(1) != on_torch.argmax(1)).sum()),
                f"{(on_ort - on_torch).abs().max():.3f} / {(on_ort - on_torch).abs().mean():.4f}",
                f"{(on_torch64 - on_torch).abs().max():.3f} / {(on_torch64 - on_torch).abs().mean():.4f}",
            ])
    mean_abs = [sum(abs(g[i]) for g in gaps) / len(gaps) for i in (0, 1)]
    summary = [[f"{method} {bits}", " / ".join(f"{g:+.2f}" for g in found), f"{statistics.mean(map(abs, found)):.2f}"]
               for (method, bits), found in per_setting.items()]
    write_report(args.out, [
        *report_header(
            f"ONNX export vs fake-quant: DeiT-tiny {', '.join(args.bits)}"
            + (f" quantized with --deploy {args.deploy}" if args.deploy else ""),
            f"- {len(images)} evaluation images per seed (32 calibration images, disjoint), "
            f"seeds {','.join(map(str, args.seeds))}",
            "- ONNX: `vitq export` graph in onnxruntime, all graph optimisations (integer kernels "
            "MatMulIntegerToFloat/QLinearMatMul)"),
        markdown_table(["seed", "model", "float-path points", "torch fp32 top-1", "torch fp64 top-1",
                        "ONNX top-1", "ONNX − fp32", "fp64 − fp32", "classes changed ONNX vs fp32",
                        "classes changed fp64 vs fp32", "|Δlogit| max / mean ONNX vs fp32",
                        "|Δlogit| max / mean fp64 vs fp32"], rows),
        "",
        f"Mean |top-1 gap| over all rows: ONNX vs fp32 {mean_abs[0]:.2f} points; fp64 vs fp32 {mean_abs[1]:.2f} "
        f"points (the same model, only float precision changed).",
        "",
        "Per model, the ONNX − fake-quant (fp32) top-1 gap of each seed and its mean |gap|:",
        "",
        markdown_table(["model", "ONNX − fp32 per seed", "mean |gap|"], summary),
        "",
    ])


if __name__ == "__main__":
    main()
