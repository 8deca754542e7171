"""The round-to-nearest error of per-row weight ranges chosen by the percentile searches, at each bit width.

Block reconstruction (AdaRound) keeps every weight row's range and learns only the rounding, so the range chosen
before it bounds what it can reach. For every Linear weight inside DeiT-tiny's blocks (float checkpoint, before any
reparameterization) this fake-quantizes each row with the range of each search and reports the relative squared
error ``Σ‖Q(W) − W‖² / Σ‖W‖²`` over all of them:

- ``repq``: the squared-error search over RepQ-ViT's percentiles (0.999, 0.9999, 0.99999; the default of
  ``repq-vit``, ``brecq``, ``qdrop``, ``aphq-vit``);
- ``wide``: the same search over 0.97 … 1 (``weight_ranges=wide``; ERQ's and I&S-ViT's);
- ``clip grid``: a reference that is no option: each row's min and max scaled by the best of 80 ratios
  1, 0.99, …, 0.21 (squared error, per row), the kind of grid the released BRECQ/QDrop code searches.

    python benchmarks/weight_ranges.py --bits 3,4 --out benchmarks/results/weight_ranges.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import comma_list, report_header, write_report

from vitq.experiment import RunSpec
from vitq.quantizers import build_quantizer
from vitq.quantizers.ranges import REPQ_PERCENTILES, WEIGHT_PERCENTILES
from vitq.report.tables import markdown_table

#: the clip ratios of the reference grid
CLIP_RATIOS = [1 - 0.01 * i for i in range(80)]


def percentile_error(weight: torch.Tensor, bits: int, percentiles: tuple[float, ...]) -> float:
    """Summed squared error of ``weight`` under per-row ranges searched over ``percentiles``."""
    quantizer = build_quantizer({"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 0,
                                 "init": "mse", "search_percentiles": list(percentiles)})
    quantizer.calibrate(weight)
    return float((quantizer(weight) - weight).square().sum())


def clip_grid_error(weight: torch.Tensor, bits: int) -> float:
    """Summed squared error of ``weight`` when each row takes its best clip ratio of :data:`CLIP_RATIOS`."""
    quantizer = build_quantizer({"kind": "uniform", "bits": bits, "granularity": "channel", "axis": 0})
    lo, hi = weight.amin(dim=1), weight.amax(dim=1)
    best = torch.full((weight.shape[0],), float("inf"))
    for ratio in CLIP_RATIOS:
        quantizer.set_range(lo * ratio, hi * ratio)
        best = torch.minimum(best, (quantizer(weight) - weight).square().sum(dim=1))
    return float(best.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=comma_list(int), default=[3, 4])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model = RunSpec.resolve(progress=False).float_model()
    weights = {name: module.weight.detach() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and name.startswith("blocks.")}
    total = sum(float(w.square().sum()) for w in weights.values())
    rows = []
    for bits in args.bits:
        repq = sum(percentile_error(w, bits, REPQ_PERCENTILES) for w in weights.values())
        wide = sum(percentile_error(w, bits, WEIGHT_PERCENTILES) for w in weights.values())
        grid = sum(clip_grid_error(w, bits) for w in weights.values())
        rows.append([f"W{bits}", f"{repq / total:.4f}", f"{wide / total:.4f}", f"{grid / total:.4f}"])
    lines = report_header("Per-row weight ranges: relative round-to-nearest error",
                          f"- weights: the {len(weights)} Linear weights inside DeiT-tiny's blocks (float checkpoint)")
    lines.append(markdown_table(["bits", "repq (0.999-0.99999)", "wide (0.97-1)", "clip grid (reference)"], rows))
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
