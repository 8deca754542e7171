"""How far the smooth optimization's learned per-channel steps move, and what their fold does to the weights.

I&S-ViT's smooth optimization (``is-vit``, ``dopq-vit --option smooth=true``) learns *per-channel* steps of the
post-LayerNorm inputs (qkv, fc1) with float weights, then folds them into the LayerNorm and the next Linear:
the Linear's input column c is multiplied by ``r_c = s_c / s̃``. Whatever spread the learned steps gain becomes a
spread of the weight's column scales, which the per-row weight quantizer then has to cover. For each variant
(method options and ``recon.KEY`` settings as in ``vitq compare``) this runs the method's calibration (the smooth
stages, not the final reconstruction) and reports, per folded Linear:

- the spread of the fold ratios, ``ln(max r / min r)`` (0 for a per-tensor input);
- the relative error of the round-to-nearest weights after the fold, ``‖Q(W) − W‖² / ‖W‖²``;
- the KL divergence of the calibrated model's prediction from float on calibration images it was not
  calibrated on (the second half of the calibration images), so no evaluation image is used.

    python benchmarks/smooth_step_drift.py --methods "is-vit,is-vit[recon.scale_relative=true;recon.scale_lr=0.03]" \\
        --bits W3A3 --out benchmarks/results/smooth_step_drift.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import agreement_with_float, deit_tiny_split, report_header, write_report

import vitq
from vitq.experiment import parse_variants
from vitq.experiment.runs import ConfigRequest
from vitq.methods import method_class
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="variants, as for vitq compare --methods")
    parser.add_argument("--bits", default="W3A3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=256, help="calibrate on the first half, score the second")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    w_bits, a_bits = (int(part) for part in args.bits.upper().lstrip("W").split("A"))
    model, calib, _ = deit_tiny_split(args.calib_size, args.seed, 1)
    half = len(calib) // 2
    fit, held_out = calib[:half], calib[half:]

    float_weights = {name: m.weight.detach().clone() for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    rows = []
    for variant in parse_variants(args.methods):
        config = ConfigRequest().build(variant.options, method=variant.method, w_bits=w_bits, a_bits=a_bits,
                                       calib_size=half, seed=args.seed)
        method = method_class(config.method)(config)
        qmodel = vitq.prepare(model, config)  # the quantizers this method asks for, uncalibrated
        torch.manual_seed(config.seed)
        method.calibrate(qmodel, fit, progress=False)
        qmodel.eval()
        spreads, errors = [], []
        for _, linear_name in qmodel.norm_linear_pairs():
            linear = qmodel.model.get_submodule(linear_name)
            weight, before = linear.weight.detach(), float_weights[linear_name]
            # W ← W·diag(r): the column ratio, read where the float column is not zero
            ratio = (weight.abs().sum(0) / before.abs().sum(0).clamp_min(1e-12)).clamp_min(1e-12)
            spreads.append(float((ratio.max() / ratio.min()).log()))
            errors.append(float((linear.weight_quantizer(weight) - weight).pow(2).sum() / weight.pow(2).sum()))
        kl, _ = agreement_with_float(model, qmodel, held_out)
        rows.append([variant.label, f"{statistics.median(spreads):.2f}", f"{max(spreads):.2f}",
                     f"{statistics.median(errors):.4f}", f"{max(errors):.4f}", f"{kl:.3f}"])
        print(" | ".join(rows[-1]), flush=True)

    write_report(args.out, [
        *report_header(
            f"Smooth optimization: learned per-channel steps and their fold, DeiT-tiny {args.bits.upper()}",
            f"- seed {args.seed}; calibrated on the first {half} of the {args.calib_size} calibration images, "
            f"KL scored on the other {len(held_out)}; no evaluation image is used",
            "- the method's calibration only (the smooth stages), before its final reconstruction"),
        "Per folded post-LayerNorm Linear (qkv, fc1): the spread of the fold ratios ln(max r / min r), and the "
        "relative error ‖Q(W) − W‖² / ‖W‖² of its round-to-nearest weights after the fold; median and max over "
        "the Linears.",
        "",
        markdown_table(["variant", "ratio spread (median)", "ratio spread (max)", "weight error (median)",
                        "weight error (max)", "held-out KL to float"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
