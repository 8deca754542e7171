"""Mixed precision against uniform bits at the same weight budget: DeiT-tiny, per method, budget and seed.

For each method, weight budget ``bits`` and seed (its own calibration images and evaluation split): the uniform
``W{bits}A8`` model, and the model whose weight bits are allocated by :mod:`vitq.mixed_precision` under
``w-avg-bits={bits}`` (menu 2,3,4,6,8, KL costs of each weight alone on the calibration images), both at the same
activation bits (at the menu's widest width only the uniform model: there is nothing to allocate). Top-1 on the
evaluation images, the paired difference, the mean weight bits and the model size, and a plot of top-1 against
model size (``<out>.png``). Each result is appended to a journal (``--journal``), so an interrupted run goes on
where it stopped.

    python benchmarks/mixed_precision.py --methods percentile,gptq --bits 3,4,6,8 --seeds 0,1,2 \
        --out benchmarks/results/mixed_precision.md
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
from vitq.report.plots import plot_pareto
from vitq.report.tables import markdown_table

CALIB = 32


def weight_mean_bits(qmodel: vitq.QuantizedModel) -> float:
    slots = [s for s in qmodel.slots() if s.role == "weight" and s.quantizer is not None]
    total = sum(s.module.weight.numel() for s in slots)
    return sum(s.quantizer.bits * s.module.weight.numel() for s in slots) / total


_COSTS: dict[tuple[str, int, int], tuple] = {}


def run_cell(method: str, seed: int, bits: int, a_bits: int) -> dict:
    spec = RunSpec.resolve(progress=False)
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(CALIB, seed)
    (calib, calib_labels), data = cache.tensors(split.calib), cache.tensors(split.eval)
    config = vitq.QuantConfig(method=method, w_bits=bits, a_bits=a_bits, calib_size=CALIB, seed=seed)
    record = {"method": method, "seed": seed, "bits": bits, "a_bits": a_bits, "n_eval": len(data[1])}
    if bits >= max(DEFAULT_MENU):
        return {**record, "uniform": evaluated(vitq.quantize(model, config, calib, progress=False), data)}
    key = (method, seed, a_bits)
    if key not in _COSTS:  # they do not depend on the budget: measured once per method and seed
        _COSTS[key] = bit_sensitivities(model, config, calib, calib, calib_labels, DEFAULT_MENU, weights=True,
                                        progress=False)
    costs, sizes = _COSTS[key]
    allocation = allocate(costs, sizes, Budget("w-avg-bits", bits).total_bits(sizes))
    overrides = [PointOverride(pattern=name, bits=b) for name, b in allocation.items()]
    mixed = vitq.quantize(model, config.model_copy(update={"overrides": overrides}), calib, progress=False)
    return {**record, "allocation": allocation,
            "uniform": evaluated(vitq.quantize(model, config, calib, progress=False), data),
            "mixed": evaluated(mixed, data)}


def evaluated(qmodel: vitq.QuantizedModel, data) -> dict:
    return {"top1": vitq.evaluate(qmodel, data, progress=False).top1, "weight_bits": weight_mean_bits(qmodel),
            "size_mb": model_size(qmodel).quantized_bytes / 1e6}


def pareto_series(done: dict, methods: list[str], budgets: list[int], seeds: list[int], a_bits: int) -> dict:
    """``"<method> uniform"`` / ``"<method> mixed"`` -> (mean sizes, mean top-1, std top-1) over the seeds."""
    series = {}
    for method in methods:
        for kind in ("uniform", "mixed"):
            points = []
            for bits in budgets:
                cells = [done[(method, s, bits, a_bits)].get(kind) for s in seeds]
                if all(cells):
                    top1 = [c["top1"] for c in cells]
                    points.append((statistics.mean(c["size_mb"] for c in cells), statistics.mean(top1),
                                   statistics.stdev(top1) if len(top1) > 1 else 0.0))
            if points:
                series[f"{method} {kind}"] = tuple(map(list, zip(*points, strict=True)))
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default=["percentile", "gptq", "erq"])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--bits", type=comma_list(int), default=[4],
                        help="weight budgets (mean bits), each also the uniform bits")
    parser.add_argument("--a-bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/mixed_precision.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_precision.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = {(record["method"], record["seed"], record["bits"], record["a_bits"]): record
            for record in journal_records(args.journal)}
    for method in args.methods:
        for bits in args.bits:
            for seed in args.seeds:
                key = (method, seed, bits, args.a_bits)
                if key in done:
                    continue
                done[key] = run_cell(method, seed, bits, args.a_bits)
                append_journal(args.journal, done[key])
                print(json.dumps(done[key]), flush=True)
    rows = []
    for method in args.methods:
        for bits in args.bits:
            cells = [done[(method, s, bits, args.a_bits)] for s in args.seeds]
            mixed = [c for c in cells if "mixed" in c]
            gains = [c["mixed"]["top1"] - c["uniform"]["top1"] for c in mixed]
            rows.append([method, f"W{bits}A{args.a_bits}", " / ".join(f"{c['uniform']['top1']:.2f}" for c in cells),
                         " / ".join(f"{c['mixed']['top1']:.2f}" for c in mixed) or "(uniform only)",
                         f"{statistics.mean(gains):+.2f}" if gains else "",
                         " / ".join(f"{c['mixed']['weight_bits']:.3f}" for c in mixed),
                         f"{cells[0]['uniform']['size_mb']:.3f}"
                         + (f" / {mixed[0]['mixed']['size_mb']:.3f}" if mixed else "")])
    plot = plot_pareto(args.out.with_suffix(".png"), pareto_series(done, args.methods, args.bits, args.seeds,
                                                                   args.a_bits),
                       title=f"DeiT-tiny, weights mixed vs uniform, A{args.a_bits}")
    write_report(args.out, [
        *report_header(
            f"Mixed precision vs uniform weights (A{args.a_bits}) at the same weight budget: DeiT-tiny",
            f"- images: {cells[0]['n_eval']} evaluation images per seed, {CALIB} calibration images of the same "
            "seeded split (the allocation's KL costs are measured on the calibration images only)",
            f"- seeds: {', '.join(map(str, args.seeds))}; budgets `w-avg-bits` "
            f"{', '.join(map(str, args.bits))}, menu {','.join(map(str, DEFAULT_MENU))}, activations at "
            f"{args.a_bits} bits in both models"),
        markdown_table(["method", "uniform setting", "uniform top-1 % per seed", "mixed top-1 % per seed",
                        "mean paired gain", "mixed mean weight bits per seed", "size MB uniform / mixed (seed "
                        f"{args.seeds[0]})"], rows),
        "",
        f"![top-1 vs model size]({plot.name})",
        "",
    ])


if __name__ == "__main__":
    main()
