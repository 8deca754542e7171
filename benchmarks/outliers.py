"""Outlier splitting on DeiT-tiny's post-LayerNorm inputs: accuracy against its cost in extra bits.

``percentile`` at each bit setting, with no split and with ``--outliers`` rules (the outlier input channels of
qkv and fc1, chosen on the calibration images, and their weight columns kept in float16): top-1 on the
evaluation images per seed, the paired gain over no split, the outlier channels per layer, the extra bits per
post-LayerNorm input element and the model size. Each result is appended to a journal (``--journal``), so an
interrupted run goes on where it stopped.

    python benchmarks/outliers.py --threads 2 --out benchmarks/results/outliers.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import append_journal, comma_list, deit_tiny_split, journal_records, report_header, write_report
from deploy_speed import CALIB, top1

import vitq
from vitq.config import OutlierConfig
from vitq.eval.size import model_size
from vitq.experiment.grammar import parse_bits
from vitq.nn.outliers import extra_bits
from vitq.report.tables import markdown_table

NONE = "none"


def run_cell(model, calib, images, labels, bits: tuple[int, int], rule: str, seed: int) -> dict:
    outliers = None if rule == NONE else OutlierConfig.parse(rule)
    config = vitq.QuantConfig(method="percentile", w_bits=bits[0], a_bits=bits[1], calib_size=CALIB, seed=seed,
                              outliers=outliers)
    qmodel = vitq.quantize(model, config, calib, progress=False)
    splits = [m.outlier_split for m in qmodel.model.modules() if getattr(m, "outlier_split", None) is not None]
    return {"bits": f"W{bits[0]}A{bits[1]}", "rule": rule, "seed": seed, "n_images": len(labels),
            "top1": top1(qmodel, images, labels), "size_mb": model_size(qmodel).quantized_bytes / 1e6,
            "outliers_per_layer": statistics.mean(s.count for s in splits) if splits else 0.0,
            "extra_act_bits": statistics.mean(extra_bits(s, bits[1]) for s in splits) if splits else 0.0}


def table_rows(records: list[dict], settings: list[str], rules: list[str]) -> list[list]:
    rows = []
    for setting in settings:
        base = {r["seed"]: r["top1"] for r in records if r["bits"] == setting and r["rule"] == NONE}
        for rule in rules:
            mine = sorted((r for r in records if r["bits"] == setting and r["rule"] == rule), key=lambda r: r["seed"])
            if not mine:
                continue
            gains = [r["top1"] - base[r["seed"]] for r in mine if r["seed"] in base]
            rows.append([setting, rule, " / ".join(f"{r['top1']:.2f}" for r in mine),
                         f"{statistics.mean(gains):+.2f}" if gains and rule != NONE else "",
                         f"{statistics.mean(r['outliers_per_layer'] for r in mine):.1f}",
                         f"{statistics.mean(r['extra_act_bits'] for r in mine):.3f}",
                         f"{statistics.mean(r['size_mb'] for r in mine):.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=comma_list(str), default=["W8A8", "W4A4"])
    parser.add_argument("--rules", type=lambda text: text.split(";"), default=[NONE, "top_k=1", "top_k=4",
                                                                               "threshold=6"],
                        help="';'-separated --outliers rules ('none': no split)")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/outliers.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/outliers.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = journal_records(args.journal)
    done = {(r["bits"], r["rule"], r["seed"]) for r in records}
    for seed in args.seeds:
        model, calib, (images, labels) = deit_tiny_split(CALIB, seed, None)
        for setting in args.bits:
            for rule in args.rules:
                if (setting, rule, seed) in done:
                    continue
                record = run_cell(model, calib, images, labels, parse_bits(setting), rule, seed)
                append_journal(args.journal, record)
                records.append(record)
                print(record, flush=True)
    write_report(args.out, [
        *report_header(
            "Outlier splitting on DeiT-tiny's post-LayerNorm inputs (`percentile`)",
            f"- images: {records[0]['n_images']} evaluation images per seed, {CALIB} calibration images (disjoint; "
            "the outlier channels are chosen on them)",
            f"- seeds: {', '.join(map(str, args.seeds))}; split layers: qkv and fc1 of every block (role `post_ln`)"),
        markdown_table(["bits", "--outliers", "top-1 % per seed", "mean paired gain", "outlier channels per layer "
                        "(of 192)", "extra bits per post-LN input element", "model MB"],
                       table_rows(records, args.bits, args.rules)),
        "",
        "Outlier channels and their weight columns are counted at 16 bits (float16). `extra bits`: the mean over the "
        "split layers of k·(16 − b)/192.",
        "",
    ])


if __name__ == "__main__":
    main()
