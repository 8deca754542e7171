"""Calibration time, evaluation speed and peak memory of a quantized DeiT-tiny (default W8A8).

Reports, from one run on one machine (so the ratio is meaningful on noisy machines):
calibration seconds, evaluation images/s of the fake-quant model and of the float model, their
ratio, and the peak resident memory of the process. Writes a markdown table.

    python benchmarks/calibration_speed.py --method percentile --w-bits 8 --a-bits 8 \
        --out benchmarks/results/calibration_speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import deit_tiny_split, report_header, write_report

import vitq
from vitq.report.runinfo import peak_rss_mb
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="percentile")
    parser.add_argument("--w-bits", type=int, default=8)
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=256, help="images timed for evaluation speed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="method option")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_speed.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {key: json.loads(value) for key, value in (text.split("=", 1) for text in args.option)}

    model, calib, (images, labels) = deit_tiny_split(args.calib_size, args.seed, args.eval_images)
    load_rss = peak_rss_mb()

    config = vitq.QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                              calib_size=args.calib_size, seed=args.seed, options=options)
    start = time.perf_counter()
    qmodel = vitq.quantize(model, config, calib, progress=False)
    calib_seconds = time.perf_counter() - start
    calib_rss = peak_rss_mb()

    # warm up both once, then time them back to back on the same images
    vitq.evaluate(model, (images[:8], labels[:8]), progress=False)
    vitq.evaluate(qmodel, (images[:8], labels[:8]), progress=False)
    float_result = vitq.evaluate(model, (images, labels), batch_size=args.batch_size, progress=False)
    quant_result = vitq.evaluate(qmodel, (images, labels), batch_size=args.batch_size, progress=False)

    rows = [
        ["calibration time (s)", f"{calib_seconds:.1f}"],
        ["float eval (images/s)", f"{float_result.images_per_s:.1f}"],
        ["fake-quant eval (images/s)", f"{quant_result.images_per_s:.1f}"],
        ["fake-quant / float speed", f"{quant_result.images_per_s / float_result.images_per_s:.2f}x"],
        ["peak RSS after loading images (MB)", f"{load_rss:.0f}"],
        ["peak RSS after calibration (MB)", f"{calib_rss:.0f}"],
        ["peak RSS overall (MB)", f"{peak_rss_mb():.0f}"],
        [f"top-1 float / {config.label} on the timed images", f"{float_result.top1:.2f} / {quant_result.top1:.2f}"],
    ]
    write_report(args.out, [
        *report_header(
            f"Calibration and evaluation speed: DeiT-tiny {config.label}",
            f"- calibration: {args.calib_size} images, seed {args.seed}; timing: {len(images)} evaluation images, "
            f"batch {args.batch_size}",
            f"- load average {os.getloadavg()[0]:.1f} at the end (other jobs on the machine slow the timings)"),
        markdown_table(["measure", "value"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
