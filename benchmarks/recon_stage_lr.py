"""One stage's reconstruction loss against the AdaRound (and LSQ step) learning rate, on calibration images only.

With a few hundred steps per stage (our CPU budget; the papers run 10-20k for AdaRound, 1000-20000 for block
reconstruction), Adam at ``weight_lr`` moves each rounding variable α by at most about ``iterations · weight_lr``,
while flipping a weight's rounding from its initial fractional part f needs |logit((f+0.1)/1.2)| (0.69 for f = 0.3).
This measures the effect: the stage's output error before and after reconstruction (hard rounding) for each
learning rate, on the reconstruction images and, with ``--holdout K``, on K further calibration images the
reconstruction never saw (a lower loss there is not just fitting the reconstruction images). A calibration-only
criterion: no evaluation image is used. ``--scale-lrs`` adds the LSQ activation-step learning rate to the grid
(the same argument: the papers' 4e-5 is meant for thousands of steps).

    python benchmarks/recon_stage_lr.py --method repq-vit --bits 3,4 --stages 0,1 --lrs 0.001,0.01,0.03 \
        --out benchmarks/results/recon_stage_lr.md
"""

from __future__ import annotations

import argparse
import copy
import itertools
from pathlib import Path

import torch
from common import comma_list, deit_tiny_split, report_header, write_report

import vitq
from vitq.calib.recon import full_loss, reconstruct_stage
from vitq.config import ReconConfig, make
from vitq.experiment.grammar import parse_option
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="repq-vit")
    parser.add_argument("--bits", type=comma_list(int), default=[3, 4], help="WxAx settings (same bits for both)")
    parser.add_argument("--stages", type=comma_list(int), default=[0, 1], help="stage indices (0: patch embedding)")
    parser.add_argument("--lrs", type=comma_list(float), default=[1e-3, 1e-2, 3e-2], help="AdaRound weight_lr values")
    parser.add_argument("--scale-lrs", type=comma_list(float), default=[ReconConfig().scale_lr],
                        help="LSQ scale_lr values (the grid is every weight_lr x scale_lr pair)")
    parser.add_argument("--recon", action="append", default=[], metavar="KEY=VALUE",
                        help="a further reconstruction setting for every run, e.g. scale_relative=true (repeatable)")
    parser.add_argument("--calib-size", type=int, default=32, help="calibration images, held-out ones included")
    parser.add_argument("--holdout", type=int, default=0,
                        help="the last K calibration images are left out of the reconstruction and scored")
    parser.add_argument("--iterations", type=int, default=ReconConfig().iterations)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recon_stage_lr.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if not 0 <= args.holdout < args.calib_size:
        parser.error(f"--holdout must be in [0, --calib-size), got {args.holdout}")
    extra = dict(parse_option(text) for text in args.recon)
    if clash := sorted(extra.keys() & {"iterations", "batch_size", "weight_lr", "scale_lr"}):
        parser.error(f"--recon {', '.join(clash)}: set by the script's own options (--iterations, --batch-size, "
                     "--lrs, --scale-lrs)")
    model, calib, _ = deit_tiny_split(args.calib_size, args.seed, 1)  # evaluation images unused
    fit_images = args.calib_size - args.holdout
    rows = []
    for bits in args.bits:
        config = vitq.QuantConfig(method=args.method, w_bits=bits, a_bits=bits, calib_size=fit_images,
                                  seed=args.seed)
        calibrated = vitq.quantize(model, config, calib[:fit_images], progress=False)  # held-out images unseen
        stages = calibrated.stages()
        for index in args.stages:
            with torch.no_grad():  # the stage's quantized input and its float output
                x = calib
                for stage in stages[:index]:
                    x = stage.run(x)
                target = calib
                with calibrated.quantization_disabled():
                    for stage in stages[:index + 1]:
                        target = stage.run(target)
            held_x, held_target = x[fit_images:], target[fit_images:]
            # the same for every learning rate: each reconstruction starts from a copy of the calibrated model
            held_before = full_loss(stages[index], held_x, held_target, args.batch_size) if args.holdout else None
            for lr, scale_lr in itertools.product(args.lrs, args.scale_lrs):
                qmodel = copy.deepcopy(calibrated)
                settings = make(ReconConfig, iterations=args.iterations, batch_size=args.batch_size, weight_lr=lr,
                                scale_lr=scale_lr, **extra)
                stage = qmodel.stages()[index]
                record = reconstruct_stage(qmodel, stage, x[:fit_images], target[:fit_images], settings,
                                           seed=args.seed, index=index, progress=False)
                row = [f"W{bits}A{bits}", record.stage, f"{lr:g}", f"{scale_lr:g}", f"{record.loss_before:.3f}",
                       f"{record.loss_after:.3f}", f"{record.loss_after / record.loss_before:.3f}"]
                if args.holdout:
                    held_after = full_loss(stage, held_x, held_target, args.batch_size)
                    row += [f"{held_before:.3f}", f"{held_after:.3f}", f"{held_after / held_before:.3f}"]
                rows.append(row)
                print(rows[-1], flush=True)

    lines = report_header(
        f"Stage reconstruction loss vs reconstruction learning rates: {args.method}, DeiT-tiny",
        f"- calibration images: {args.calib_size} (seed {args.seed}): reconstruction on {fit_images}, "
        f"{args.holdout} held out; losses are measured on them (no evaluation images)",
        f"- reconstruction: {args.iterations} iterations, batch {args.batch_size}, "
        + (f"{', '.join(args.recon)}, " if args.recon else "") + "other settings the defaults")
    columns = ["bits", "stage", "weight_lr", "scale_lr", "loss before", "loss after", "after / before"]
    if args.holdout:
        columns += ["held-out before", "held-out after", "held-out after / before"]
    write_report(args.out, [*lines, markdown_table(columns, rows), ""])


if __name__ == "__main__":
    main()
