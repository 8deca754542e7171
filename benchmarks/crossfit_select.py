"""Choose between method variants without evaluation images: 2-fold cross-fit on the calibration images.

For each seed, that seed's calibration images (the ones ``vitq eval --calib-size N --seed S`` uses) are cut
into two halves. Each variant is calibrated on one half and scored on the other, then the halves swap. The
score is the mean KL divergence of the quantized model's class distribution from the float model's (and the
top-1 agreement with float). The evaluation images are never loaded, so a default chosen by this table is
not tuned on them. Calibrating on half the images makes every variant a little worse; only the ranking is used.

Variants take method options and reconstruction settings as in ``vitq compare`` (``qdrop[recon.scale_lr=4e-4]``).
A reconstruction takes minutes per variant, so ``--folds 1`` scores the first fold only, and ``--journal FILE``
records every (seed, variant, fold) score as it is made: a rerun with the same journal skips what is in it.

    python benchmarks/crossfit_select.py --methods "repq-vit,dopq-vit[target=mean],dopq-vit" --bits W4A4 \\
        --seeds 0,1,2 --out benchmarks/results/dopq_default_selection.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import (
    agreement_with_float,
    append_journal,
    comma_list,
    deit_tiny_split,
    journal_records,
    report_header,
    write_report,
)

import vitq
from vitq.experiment import parse_variants
from vitq.experiment.runs import ConfigRequest
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="variants, as for vitq compare --methods")
    parser.add_argument("--bits", default="W4A4")
    parser.add_argument("--seeds", type=comma_list(int), default="0,1,2")
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--folds", type=int, choices=(1, 2), default=2,
                        help="2: each half calibrates once and scores the other; 1: the first half only")
    parser.add_argument("--journal", type=Path, help="JSON lines of the scores made so far (resumed from)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = parse_variants(args.methods)
    w_bits, a_bits = (int(part) for part in args.bits.upper().lstrip("W").split("A"))

    done = {json.dumps(r["key"], sort_keys=True): (r["kl"], r["agree"])
            for r in (journal_records(args.journal) if args.journal else [])}
    scores: dict[str, list[tuple[float, float]]] = {v.label: [] for v in variants}
    for seed in args.seeds:
        model, calib, _ = deit_tiny_split(args.calib_size, seed, 1)
        half = len(calib) // 2
        folds = [(calib[:half], calib[half:]), (calib[half:], calib[:half])][:args.folds]
        for v in variants:
            fold_scores = []
            for fold, (fit, held_out) in enumerate(folds):
                key = {"seed": seed, "variant": v.label, "bits": args.bits, "calib_size": args.calib_size,
                       "fold": fold}
                if (ident := json.dumps(key, sort_keys=True)) in done:
                    fold_scores.append(done[ident])
                    continue
                config = ConfigRequest().build(v.options, method=v.method, w_bits=w_bits, a_bits=a_bits,
                                               calib_size=len(fit), seed=seed)
                qmodel = vitq.quantize(model, config, fit, progress=False)
                fold_scores.append(agreement_with_float(model, qmodel, held_out))
                if args.journal:
                    append_journal(args.journal, {"key": key, "kl": fold_scores[-1][0], "agree": fold_scores[-1][1]})
            kl, agree = (statistics.mean(s[i] for s in fold_scores) for i in (0, 1))
            scores[v.label].append((kl, agree))
            print(f"seed {seed} {v.label}: held-out KL {kl:.4f}, top-1 agreement {agree:.1f} %", flush=True)

    def spread(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {std:.4f}"

    ranked = sorted(variants, key=lambda v: statistics.mean(s[0] for s in scores[v.label]))
    rows = [[rank, v.label, spread([s[0] for s in scores[v.label]]),
             f"{statistics.mean(s[1] for s in scores[v.label]):.1f}"] for rank, v in enumerate(ranked, 1)]
    write_report(args.out, [
        *report_header(
            f"Cross-fit selection on calibration images: DeiT-tiny W{w_bits}A{a_bits}",
            f"- seeds: {', '.join(map(str, args.seeds))}; per seed the {args.calib_size} calibration images, "
            f"{'2 folds' if args.folds == 2 else 'the first of 2 folds'} of {args.calib_size // 2} (calibrate on "
            "one half, score on the other); no evaluation image is used"),
        "Held-out KL(float ‖ quantized) of the class distribution, mean ± std over seeds (lower is better):",
        "",
        markdown_table(["rank", "variant", "held-out KL", "top-1 agreement with float %"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
