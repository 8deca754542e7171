"""Block reconstruction on DeiT-tiny: top-1 against reconstruction iterations, with wall time and peak memory.

For each seed the method is calibrated once (calibration only, 0 iterations), then a copy of that model is
reconstructed (`vitq.calib.recon`) with each iteration count; every model is evaluated on the same evaluation
images (the split left by ``--calib-size``). Reports per run: reconstruction seconds, top-1, the paired gain over
calibration only, and the process's peak resident memory so far. Writes a markdown table.

    python benchmarks/reconstruction.py --method dopq-vit --w-bits 4 --a-bits 4 --calib-size 256 \
        --iterations 0,50,100,200 --seeds 0 --threads 2 --out benchmarks/results/reconstruction_dopq_w4a4.md
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from common import comma_list, deit_tiny_split, report_header, write_report

import vitq
from vitq.calib.recon import reconstruct_model
from vitq.config import ReconConfig, make
from vitq.report.runinfo import peak_rss_mb
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dopq-vit")
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--a-bits", type=int, default=4)
    parser.add_argument("--calib-size", type=int, default=256)
    parser.add_argument("--seeds", type=comma_list(int), default=[0])
    parser.add_argument("--iterations", type=comma_list(int), default=[0, 50, 100, 200])
    parser.add_argument("--batch-size", type=int, default=ReconConfig().batch_size, help="reconstruction batch")
    parser.add_argument("--drop-prob", type=float, default=0.0, help="QDrop probability")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruction.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.iterations[0] != 0:  # the gains are paired against calibration only
        args.iterations = [0, *args.iterations]

    rows, n_eval = [], 0
    for seed in args.seeds:
        model, calib, (images, labels) = deit_tiny_split(args.calib_size, seed, 10**9)
        n_eval = len(images)
        float_top1 = vitq.evaluate(model, (images, labels), progress=False).top1
        config = vitq.QuantConfig(method=args.method, w_bits=args.w_bits, a_bits=args.a_bits,
                                  calib_size=args.calib_size, seed=seed)
        start = time.perf_counter()
        calibrated = vitq.quantize(model, config, calib, progress=False)
        calib_seconds = time.perf_counter() - start
        base_top1 = None
        for iterations in args.iterations:
            qmodel, seconds = calibrated, 0.0
            if iterations:
                qmodel = copy.deepcopy(calibrated)
                settings = make(ReconConfig, iterations=iterations, batch_size=args.batch_size,
                                drop_prob=args.drop_prob)
                start = time.perf_counter()
                reconstruct_model(qmodel, calib, settings, seed=seed, progress=False)
                seconds = time.perf_counter() - start
            top1 = vitq.evaluate(qmodel, (images, labels), progress=False).top1
            base_top1 = top1 if base_top1 is None else base_top1
            rows.append([seed, iterations, f"{calib_seconds:.0f}", f"{seconds:.0f}", f"{float_top1:.2f}",
                         f"{top1:.2f}", f"{float_top1 - top1:.2f}", f"{top1 - base_top1:+.2f}", f"{peak_rss_mb():.0f}"])
            print(rows[-1], flush=True)

    lines = report_header(
        f"Block reconstruction: {args.method} W{args.w_bits}A{args.a_bits}, DeiT-tiny",
        f"- calibration images: {args.calib_size} (calibration and reconstruction), evaluation images: {n_eval} "
        f"per seed (disjoint)",
        f"- reconstruction: batch {args.batch_size}, drop_prob {args.drop_prob}, other settings the defaults of "
        f"`vitq.config.ReconConfig`; seeds {', '.join(map(str, args.seeds))}",
        "- gain: top-1 minus the calibration-only top-1 of the same seed (first row of the seed, paired)")
    columns = ["seed", "iterations / block", "calibration s", "reconstruction s", "float top-1 %", "top-1 %",
               "drop", "gain", "peak RSS MB"]
    write_report(args.out, [*lines, markdown_table(columns, rows), ""])


if __name__ == "__main__":
    main()
