"""int8 or uint8 weights in onnxruntime: accuracy against fake-quant and speed of W8A8 DeiT-tiny on this CPU.

On x86 CPUs without VNNI, onnxruntime's u8·s8 integer GEMMs add pairs of products in int16 and saturate;
``vitq.eval.ort`` then runs the file with its weights stored as uint8 (u8·u8 GEMMs, exact). This script runs the
same exports both ways, in one process on the same images and threads, beside onnxruntime's float model: top-1,
mean |logits − fake-quant logits|, top-1 agreement with fake-quant, batch-1 latency and batch-32 throughput.

    python benchmarks/int8_weights.py --threads 2 --out benchmarks/results/int8_weights.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import deit_tiny_split, report_header, write_report
from deploy_speed import cpu_flags, target_config, timings, top1

import vitq
from vitq.eval.ort import OrtModel
from vitq.export.int8_gemm import int8_gemm_saturates
from vitq.export.onnx import export_onnx
from vitq.export.ort import export_onnxruntime
from vitq.report.tables import markdown_table


@torch.no_grad()
def batched_logits(model, images: torch.Tensor) -> torch.Tensor:
    """``model``'s logits on ``images``, in batches of 64."""
    return torch.cat([model(images[i:i + 64]) for i in range(0, len(images), 64)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="percentile,repq-vit", help="comma-separated methods (W8A8)")
    parser.add_argument("--eval-size", type=int, default=968)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=50, help="batch-1 calls per timing")
    parser.add_argument("--runs-batch", type=int, default=5, help="batch calls per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_weights.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, calib, (images, labels) = deit_tiny_split(32, args.seed, args.eval_size)
    rows, engines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        float_onnx = Path(tmp) / "float.onnx"
        export_onnx(vitq.prepare(model, vitq.QuantConfig(method="float")), float_onnx)
        engines["ORT float"] = OrtModel(float_onnx, threads=args.threads)
        rows.append(["ORT float", "", f"{top1(engines['ORT float'], images, labels):.2f}", "", "", ""])
        for method in args.methods.split(","):
            deploy = None if method == "percentile" else "onnxruntime"
            qmodel = vitq.quantize(model, target_config(method, args.seed, deploy), calib, progress=False)
            reference = batched_logits(qmodel, images)
            fake_top1 = 100.0 * (reference.argmax(1) == labels).float().mean().item()
            path = Path(tmp) / f"{method}.onnx"
            (export_onnx if deploy is None else export_onnxruntime)(qmodel, path)
            for weights, unsigned in (("int8", False), ("uint8", True)):
                name = f"vitq `{method}`, {weights} weights"
                engine = engines[name] = OrtModel(path, threads=args.threads, unsigned_weights=unsigned)
                logits = batched_logits(engine, images)
                agree = 100.0 * (logits.argmax(1) == reference.argmax(1)).float().mean().item()
                rows.append([name, f"{fake_top1:.2f}", f"{100.0 * (logits.argmax(1) == labels).float().mean():.2f}",
                             f"{(logits - reference).abs().mean():.4f}", f"{(logits - reference).abs().max():.3f}",
                             f"{agree:.1f}"])
        speed = timings(engines, images, args)
    for row in rows:
        latency, throughput = speed[row[0]]
        row += [f"{latency * 1e3:.2f}", f"{throughput:.0f}"]
    lines = report_header(
        "int8 vs uint8 weights in onnxruntime: W8A8 DeiT-tiny",
        f"- images: {len(images)} evaluation images (top-1), 32 calibration images, seed {args.seed}",
        f"- latency: median of {args.runs} batch-1 calls; throughput: median of {args.runs_batch} batch-"
        f"{args.batch} calls; each the median of {args.rounds} rounds that time every engine in turn",
        f"- threads: {args.threads}; CPU flags: {cpu_flags()}; onnxruntime's u8·s8 GEMMs saturate here: "
        f"{'yes' if int8_gemm_saturates() else 'no'}")
    lines.append(markdown_table(["engine", "fake-quant top-1 %", "top-1 %", "mean |Δ logit|", "max |Δ logit|",
                             "agrees with fake-quant %", "batch-1 ms", f"batch-{args.batch} img/s"], rows))
    write_report(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
