"""Hadamard rotation (``--rotate``) before quantization, against the same method without it: DeiT-tiny.

For each method, bit setting and seed (its own 32 calibration images and evaluation split), the model quantized
with and without ``QuantConfig.rotate`` (the rotation's signs drawn from the same seed): top-1 on the evaluation
images and the paired difference. Also, once per seed, how evenly the rotation spreads the post-LayerNorm inputs
of the first block's ``qkv`` (largest over median channel max |x| on the calibration images, before and after).
Each result is appended to a journal (``--journal``), so an interrupted run goes on where it stopped.

    python benchmarks/rotation.py --methods percentile,gptq --bits W8A8,W4A4 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import append_journal, comma_list, deit_tiny_split, journal_records, report_header, write_report

import vitq
from vitq.experiment.grammar import parse_bits
from vitq.report.tables import markdown_table

CALIB = 32


def channel_spread(qmodel: vitq.QuantizedModel, calib: torch.Tensor) -> float:
    """max / median over channels of max |x| at the input of ``blocks.0.attn.qkv``, in float."""
    seen = []
    layer = qmodel.model.blocks[0].attn.qkv
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().abs().amax((0, 1))))
    try:
        with torch.no_grad(), qmodel.quantization_disabled():
            qmodel(calib)
    finally:
        hook.remove()
    return float(seen[0].max() / seen[0].median())


def run_cell(method: str, bits: str, seed: int) -> dict:
    model, calib, data = deit_tiny_split(CALIB, seed, 10_000)
    w_bits, a_bits = parse_bits(bits)
    record = {"method": method, "bits": bits, "seed": seed, "n_eval": len(data[1])}
    for rotate in (False, True):
        config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=CALIB, seed=seed,
                                  rotate=rotate)
        qmodel = vitq.quantize(model, config, calib, progress=False)
        key = "rotated" if rotate else "plain"
        record[key] = vitq.evaluate(qmodel, data, progress=False).top1
        record[f"{key}_spread"] = channel_spread(qmodel, calib)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default=["percentile", "gptq"])
    parser.add_argument("--bits", type=comma_list(str), default=["W8A8", "W4A4"])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/rotation.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/rotation.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    done = {(r["method"], r["bits"], r["seed"]): r for r in journal_records(args.journal)}
    for method in args.methods:
        for bits in args.bits:
            for seed in args.seeds:
                if (method, bits, seed) not in done:
                    done[method, bits, seed] = run_cell(method, bits, seed)
                    append_journal(args.journal, done[method, bits, seed])
                    print(json.dumps(done[method, bits, seed]), flush=True)
    rows = []
    for method in args.methods:
        for bits in args.bits:
            cells = [done[method, bits, s] for s in args.seeds]
            gains = [c["rotated"] - c["plain"] for c in cells]
            rows.append([method, bits, " / ".join(f"{c['plain']:.2f}" for c in cells),
                         " / ".join(f"{c['rotated']:.2f}" for c in cells),
                         f"{statistics.mean(gains):+.2f}" + (f" ± {statistics.stdev(gains):.2f}" if len(gains) > 1
                                                             else "")])
    spread = [done[args.methods[0], args.bits[0], s] for s in args.seeds]
    write_report(args.out, [
        *report_header(
            "Hadamard rotation before quantization: DeiT-tiny",
            f"- images: {cells[0]['n_eval']} evaluation images per seed, {CALIB} calibration images of the same "
            "seeded split; the rotation's random signs drawn from the seed",
            f"- seeds: {', '.join(map(str, args.seeds))}"),
        markdown_table(["method", "bits", "top-1 % per seed, plain", "top-1 % per seed, `--rotate`",
                        "paired gain (mean ± std)"], rows),
        "",
        "Spread of the post-LayerNorm input of `blocks.0.attn.qkv` (largest over median per-channel max |x| on the "
        "calibration images, float model) per seed, plain → rotated: "
        + ", ".join(f"{c['plain_spread']:.1f} → {c['rotated_spread']:.1f}" for c in spread) + ".",
        "",
    ])


if __name__ == "__main__":
    main()
