"""Mixed precision against uniform bits at the same budget: DeiT-tiny, per method, budget and seed.

For each method, budget ``bits`` and seed (its own calibration images and evaluation split), with ``--role weights``
(the default): the uniform ``W{bits}A{a_bits}`` model, and the model whose weight bits are allocated by
:mod:`vitq.mixed_precision` under ``w-avg-bits={bits}``, both at the same activation bits. With ``--role
activations``: the uniform ``W{w_bits}A{bits}`` model, and the model whose activation bits are allocated under
``a-avg-bits={bits}`` with the weights at ``w_bits`` in both (the same model size). The menu (``--menu``) is
2,3,4,6,8, the costs each point alone (KL to float) on the calibration images; at the menu's widest width only the
uniform model is run (there is nothing to allocate). Top-1 on the evaluation images, the paired difference, the mean
bits of the allocated role and the model size, and a plot of top-1 against model size (``<out>.png``, weights) or
mean activation bits (activations). Each result is appended to a journal (``--journal``), so an interrupted run goes
on where it stopped.

    python benchmarks/mixed_precision.py --methods percentile,gptq --bits 3,4,6,8 --seeds 0,1,2 \
        --out benchmarks/results/mixed_precision.md
    python benchmarks/mixed_precision.py --role activations --w-bits 4 --bits 4 \
        --journal benchmarks/results/mixed_precision_activations.jsonl \
        --out benchmarks/results/mixed_precision_activations.md
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
from vitq.mixed_precision import DEFAULT_MENU, Budget, allocate, bit_sensitivities, point_sizes
from vitq.report.plots import plot_pareto
from vitq.report.tables import markdown_table

CALIB = 32


def mean_bits(qmodel: vitq.QuantizedModel, weights: bool, image: torch.Tensor) -> float:
    """Mean bits per element of the weights, or of the activations of one ``image``."""
    sizes = point_sizes(qmodel, image, weights)
    bits = {s.name: s.quantizer.bits for s in qmodel.slots() if s.name in sizes}
    return sum(bits[name] * n for name, n in sizes.items()) / sum(sizes.values())


def bits_field(weights: bool) -> str:
    """The journal field of the allocated role's mean bits."""
    return "weight_bits" if weights else "act_bits"


_COSTS: dict[tuple, tuple] = {}


def cell_key(record: dict) -> tuple:
    """A journal record's cell: role, method, seed, budget bits and the fixed bits of the other role (records
    without a role are weight budgets)."""
    role = record.get("role", "weights")
    return role, record["method"], record["seed"], record["bits"], record["a_bits" if role == "weights" else "w_bits"]


def run_cell(role: str, method: str, seed: int, bits: int, other_bits: int, menu: list[int]) -> dict:
    weights = role == "weights"
    spec = RunSpec.resolve(progress=False)
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(CALIB, seed)
    (calib, calib_labels), data = cache.tensors(split.calib), cache.tensors(split.eval)
    w_bits, a_bits = (bits, other_bits) if weights else (other_bits, bits)
    config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=CALIB, seed=seed)
    record = {"method": method, "seed": seed, "bits": bits, "n_eval": len(data[1]),
              **({"a_bits": a_bits} if weights else {"role": role, "w_bits": w_bits})}

    def evaluated(qmodel: vitq.QuantizedModel) -> dict:
        return {"top1": vitq.evaluate(qmodel, data, progress=False).top1,
                bits_field(weights): mean_bits(qmodel, weights, calib[:1]),
                "size_mb": model_size(qmodel).quantized_bytes / 1e6}

    uniform = evaluated(vitq.quantize(model, config, calib, progress=False))
    if bits >= max(menu):
        return {**record, "uniform": uniform}
    key = (role, method, seed, other_bits, tuple(menu))
    if key not in _COSTS:  # they do not depend on the budget: measured once per method and seed
        _COSTS[key] = bit_sensitivities(model, config, calib, calib, calib_labels, menu, weights=weights,
                                        progress=False)
    costs, sizes = _COSTS[key]
    budget = Budget("w-avg-bits" if weights else "a-avg-bits", bits)
    allocation = allocate(costs, sizes, budget.total_bits(sizes))
    overrides = [PointOverride(pattern=name, bits=b) for name, b in allocation.items()]
    mixed = vitq.quantize(model, config.model_copy(update={"overrides": overrides}), calib, progress=False)
    return {**record, "allocation": allocation, "uniform": uniform, "mixed": evaluated(mixed)}


def pareto_series(done: dict, cells: list[tuple], seeds: list[int], x: str) -> dict:
    """``"<method> uniform"`` / ``"<method> mixed"`` -> (mean ``x``, mean top-1, std top-1) over the seeds, one point
    per budget; ``cells`` the (role, method, budget, other bits) to plot."""
    series = {}
    for kind in ("uniform", "mixed"):
        for role, method, bits, other in cells:
            runs = [done[(role, method, s, bits, other)].get(kind) for s in seeds]
            if all(runs):
                top1 = [r["top1"] for r in runs]
                point = (statistics.mean(r[x] for r in runs), statistics.mean(top1),
                         statistics.stdev(top1) if len(top1) > 1 else 0.0)
                series.setdefault(f"{method} {kind}", []).append(point)
    return {label: tuple(map(list, zip(*points, strict=True))) for label, points in series.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["weights", "activations"], default="weights",
                        help="what the budget allocates; the other role stays uniform")
    parser.add_argument("--methods", type=comma_list(str), default=["percentile", "gptq", "erq"])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--bits", type=comma_list(int), default=[4],
                        help="budgets (mean bits of the allocated role), each also the uniform bits")
    parser.add_argument("--a-bits", type=int, default=8, help="activation bits of a weight budget's models")
    parser.add_argument("--w-bits", type=int, default=4, help="weight bits of an activation budget's models")
    parser.add_argument("--menu", type=comma_list(int), default=list(DEFAULT_MENU),
                        help="the bit-widths a point may get (the same for every cell of a journal)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/mixed_precision.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixed_precision.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    weights = args.role == "weights"
    other = args.a_bits if weights else args.w_bits
    done = {cell_key(record): record for record in journal_records(args.journal)}
    for method in args.methods:
        for bits in args.bits:
            for seed in args.seeds:
                key = (args.role, method, seed, bits, other)
                if key in done:
                    continue
                done[key] = run_cell(args.role, method, seed, bits, other, args.menu)
                append_journal(args.journal, done[key])
                print(json.dumps(done[key]), flush=True)
    rows = []
    for method in args.methods:
        for bits in args.bits:
            cells = [done[(args.role, method, s, bits, other)] for s in args.seeds]
            mixed = [c for c in cells if "mixed" in c]
            gains = [c["mixed"]["top1"] - c["uniform"]["top1"] for c in mixed]
            rows.append([method, f"W{bits}A{other}" if weights else f"W{other}A{bits}",
                         " / ".join(f"{c['uniform']['top1']:.2f}" for c in cells),
                         " / ".join(f"{c['mixed']['top1']:.2f}" for c in mixed) or "(uniform only)",
                         f"{statistics.mean(gains):+.2f}" if gains else "",
                         " / ".join(f"{c['mixed'][bits_field(weights)]:.3f}" for c in mixed),
                         f"{cells[0]['uniform']['size_mb']:.3f}"
                         + (f" / {mixed[0]['mixed']['size_mb']:.3f}" if mixed else "")])
    role_text = "weight" if weights else "activation"
    plot = plot_pareto(args.out.with_suffix(".png"), pareto_series(
        done, [(args.role, m, b, other) for m in args.methods for b in args.bits], args.seeds,
        "size_mb" if weights else bits_field(weights)),
        title=f"DeiT-tiny, weights mixed vs uniform, A{other}" if weights
        else f"DeiT-tiny, activations mixed vs uniform, W{other}",
        xlabel="model size (MB)" if weights else "mean activation bits")
    write_report(args.out, [
        *report_header(
            f"Mixed precision vs uniform {role_text}s ({'A' if weights else 'W'}{other}) at the same {role_text} "
            "budget: DeiT-tiny",
            f"- images: {cells[0]['n_eval']} evaluation images per seed, {CALIB} calibration images of the same "
            "seeded split (the allocation's KL costs are measured on the calibration images only)",
            f"- seeds: {', '.join(map(str, args.seeds))}; budgets `{'w' if weights else 'a'}-avg-bits` "
            f"{', '.join(map(str, args.bits))}, menu {','.join(map(str, args.menu))}, "
            f"{'activations' if weights else 'weights'} at {other} bits in both models"),
        markdown_table(["method", "uniform setting", "uniform top-1 % per seed", "mixed top-1 % per seed",
                        "mean paired gain", f"mixed mean {role_text} bits per seed",
                        f"size MB uniform / mixed (seed {args.seeds[0]})"], rows),
        "",
        f"![top-1 vs {'model size' if weights else 'activation bits'}]({plot.name})",
        "",
    ])


if __name__ == "__main__":
    main()
