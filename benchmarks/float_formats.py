"""Floating-point formats against integer quantizers on DeiT-tiny: the same method, every point in one format.

For each seed (its own 32 calibration images and evaluation split) and each setting, ``percentile`` quantizes
DeiT-tiny with every quantization point overridden to one kind (``--override '*=KIND'``): 8-bit settings
(uniform int8, FP8 E4M3, FP8 E5M2, MXFP8) and 4-bit ones (uniform int4, FP4 E2M1 with one scale per tensor or
output channel, MXFP4 with a power-of-two scale per 32 elements, NVFP4 with an E4M3 scale per 16). Top-1 and
the drop from float on the same images; mean and spread over the seeds. Each result is appended to a journal
(``--journal``), so an interrupted run goes on where it stopped.

    python benchmarks/float_formats.py --out benchmarks/results/float_formats.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import append_journal, comma_list, deit_tiny_split, journal_records, report_header, write_report

import vitq
from vitq.config import PointOverride
from vitq.report.tables import markdown_table

CALIB = 32
#: (setting, bits of the int baseline, override kind or None for the uniform integer quantizers)
SETTINGS = [("int8 (uniform)", 8, None), ("FP8 E4M3", 8, "fp8_e4m3"), ("FP8 E5M2", 8, "fp8_e5m2"),
            ("MXFP8 (E4M3, 32-element blocks)", 8, "mxfp8"), ("int4 (uniform)", 4, None), ("FP4 E2M1", 4, "fp4_e2m1"),
            ("MXFP4 (E2M1, 32-element blocks)", 4, "mxfp4"), ("NVFP4 (E2M1, 16-element blocks)", 4, "nvfp4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/float_formats.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/float_formats.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = journal_records(args.journal)
    done = {(record["setting"], record["seed"]): record["top1"] for record in records}
    n_eval = records[-1]["n_eval"] if records else 0  # every seed's split has as many evaluation images
    for seed in args.seeds:
        if all((name, seed) in done for name in ["float"] + [s[0] for s in SETTINGS]):
            continue
        model, calib, data = deit_tiny_split(CALIB, seed, None)
        n_eval = len(data[1])
        for name, bits, kind in [("float", 8, None), *SETTINGS]:
            if (name, seed) in done:
                continue
            overrides = [] if kind is None else [PointOverride.parse(f"*={kind}")]
            config = vitq.QuantConfig(method="float" if name == "float" else "percentile", w_bits=bits, a_bits=bits,
                                      calib_size=CALIB, seed=seed, overrides=overrides)
            qmodel = vitq.quantize(model, config, calib, progress=False)
            top1 = vitq.evaluate(qmodel, data, progress=False).top1
            done[(name, seed)] = top1
            append_journal(args.journal, {"setting": name, "seed": seed, "top1": top1, "n_eval": n_eval})
            print(name, seed, f"{top1:.2f}", flush=True)
    rows = []
    for name, _, kind in SETTINGS:
        drops = [done[("float", s)] - done[(name, s)] for s in args.seeds]
        rows.append([name, f"`{kind}`" if kind else "`uniform`",
                     " / ".join(f"{done[(name, s)]:.2f}" for s in args.seeds),
                     f"{statistics.mean(drops):.2f}", f"{statistics.pstdev(drops):.2f}"])
    floats = " / ".join(f"{done[('float', s)]:.2f}" for s in args.seeds)
    write_report(args.out, [
        *report_header(
            "Floating-point formats vs integer quantizers: DeiT-tiny, `percentile`, every point in one format",
            f"- images: {n_eval} evaluation images per seed, {CALIB} calibration images of the same seeded split",
            f"- seeds: {', '.join(map(str, args.seeds))}; float top-1 per seed: {floats}",
            "- every quantization point (Linear/conv weights per output channel, activations per tensor, the "
            "attention q/k/v and softmax output) in the setting's format; `uniform` and the FP kinds choose their "
            "scale by `percentile`'s MSE search (uniform: over high percentiles; FP: over 25 clipping ratios), "
            "MX/NVFP4 compute their block scales from the tensor (blocks along the last dimension)"),
        markdown_table(["setting", "kind", "top-1 % per seed", "mean drop from float", "spread (std)"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
