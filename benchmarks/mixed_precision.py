"""Mixed precision against uniform bits at the same weight budget: DeiT-tiny, per method and seed.

For each method and seed (its own calibration images and evaluation split): the uniform ``W{bits}A8`` model, and
the model whose weight bits are allocated by :mod:`vitq.mixed_precision` under ``w-avg-bits={bits}`` (menu
2,3,4,6,8, KL costs of each weight alone on the calibration images), both at the same activation bits. Top-1 on
the evaluation images, the paired difference, the mean weight bits and the model size. Each result is appended
to a journal (``--journal``), so an interrupted run goes on where it stopped.

    python benchmarks/mixed_precision.py --methods percentile --seeds 0 --out benchmarks/results/mixed_precision.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import append_journal, comma_list, journal_records, report_header, write_report

import vitq
from vitq.config import PointOverride
from vitq.eval.size import model_size
from vitq.experiment import RunSpec
from vitq.mixed_precision import DEFAULT_MENU, Budget, allocate, bit_sensitivities
from vitq.report.tables import markdown_table

CALIB = 32


def weight_mean_bits(qmodel: vitq.QuantizedModel) -> float:
    slots = [s for s in qmodel.slots() if s.role == "weight" and s.quantizer is not None]
    total = sum(s.module.weight.numel() for s in slots)
    return sum(s.quantizer.bits * s.module.weight.numel() for s in slots) / total


def run_cell(method: str, seed: int, bits: int, a_bits: int) -> dict:
    spec = RunSpec.resolve(progress=False)
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(CALIB, seed)
    (calib, calib_labels), data = cache.tensors(split.calib), cache.tensors(split.eval)
    config = vitq.QuantConfig(method=method, w_bits=bits, a_bits=a_bits, calib_size=CALIB, seed=seed)
    costs, sizes = bit_sensitivities(model, config, calib, calib, calib_labels, DEFAULT_MENU, weights=True,
                                     progress=False)
    allocation = allocate(costs, sizes, Budget("w-avg-bits", bits).total_bits(sizes))
    overrides = [PointOverride(pattern=name, bits=b) for name, b in allocation.items()]
    models = {"uniform": vitq.quantize(model, config, calib, progress=False),
              "mixed": vitq.quantize(model, config.model_copy(update={"overrides": overrides}), calib,
                                     progress=False)}
    record = {"method": method, "seed": seed, "bits": bits, "a_bits": a_bits, "n_eval": len(data[1]),
              "allocation": allocation}
    for name, qmodel in models.items():
        record[name] = {"top1": vitq.evaluate(qmodel, data, progress=False).top1,
                        "weight_bits": weight_mean_bits(qmodel), "size_mb": model_size(qmodel).quantized_bytes / 1e6}
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default=["percentile", "gptq", "erq"])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--bits", type=int, default=4, help="the weight budget (mean bits) and the uniform bits")
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/mixed_precision.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_precision.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = {(record["method"], record["seed"], record["bits"], record["a_bits"]): record
            for record in journal_records(args.journal)}
    for method in args.methods:
        for seed in args.seeds:
            key = (method, seed, args.bits, args.a_bits)
            if key in done:
                continue
            done[key] = run_cell(method, seed, args.bits, args.a_bits)
            append_journal(args.journal, done[key])
            print(json.dumps(done[key]), flush=True)
    rows = []
    for method in args.methods:
        cells = [done[(method, s, args.bits, args.a_bits)] for s in args.seeds]
        gains = [c["mixed"]["top1"] - c["uniform"]["top1"] for c in cells]
        rows.append([method, " / ".join(f"{c['uniform']['top1']:.2f}" for c in cells),
                     " / ".join(f"{c['mixed']['top1']:.2f}" for c in cells), f"{statistics.mean(gains):+.2f}",
                     " / ".join(f"{c['mixed']['weight_bits']:.3f}" for c in cells),
                     f"{cells[0]['uniform']['size_mb']:.3f} / {cells[0]['mixed']['size_mb']:.3f}"])
    write_report(args.out, [
        *report_header(
            f"Mixed precision vs uniform W{args.bits}A{args.a_bits} at the same weight budget: DeiT-tiny",
            f"- images: {cells[0]['n_eval']} evaluation images per seed, {CALIB} calibration images of the same "
            "seeded split (the allocation's KL costs are measured on the calibration images only)",
            f"- seeds: {', '.join(map(str, args.seeds))}; budget `w-avg-bits={args.bits}`, menu "
            f"{','.join(map(str, DEFAULT_MENU))}, activations at {args.a_bits} bits in both models"),
        markdown_table(["method", f"uniform W{args.bits} top-1 % per seed", "mixed top-1 % per seed",
                        "mean paired gain", "mixed mean weight bits per seed", "size MB uniform / mixed (seed "
                        f"{args.seeds[0]})"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
