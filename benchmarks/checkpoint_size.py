"""Packed checkpoint size of DeiT-tiny at each weight bit width, against the float safetensors file.

Also checks that every packed file reloads to bit-identical logits on a few evaluation images.

    python benchmarks/checkpoint_size.py --out benchmarks/results/checkpoint_size.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import comma_list, deit_tiny_split, report_header, write_report

import vitq
from vitq.assets import DEIT_TINY_CHECKPOINT, assets_dir
from vitq.report.tables import markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="minmax")
    parser.add_argument("--bits", type=comma_list(int), default="8,6,4,3,2",
                        help="weight bit widths (activations stay at 8)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint_size.md"))
    args = parser.parse_args()

    model, calib, (images, _) = deit_tiny_split(32, 0, 8)
    float_bytes = (assets_dir() / DEIT_TINY_CHECKPOINT).stat().st_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for bits in args.bits:
            qmodel = vitq.quantize(model, vitq.QuantConfig(method=args.method, w_bits=bits, a_bits=8), calib,
                                   progress=False)
            packed = vitq.save(qmodel, Path(tmp) / f"w{bits}.safetensors")
            plain = vitq.save(qmodel, Path(tmp) / f"w{bits}_float.safetensors", packed=False)
            exact = torch.equal(vitq.load(packed)(images), qmodel(images))
            size = packed.stat().st_size
            rows.append([f"W{bits}", f"{size / 1e6:.2f}", f"{size / float_bytes:.3f}",
                         f"{plain.stat().st_size / 1e6:.2f}", "yes" if exact else "NO"])
    write_report(args.out, [
        *report_header(
            "Packed checkpoint size: DeiT-tiny",
            f"- method {args.method}, 32 calibration images (seed 0); float file: {DEIT_TINY_CHECKPOINT} "
            f"({float_bytes / 1e6:.2f} MB); reload checked on 8 evaluation images"),
        markdown_table(["weights", "packed MB", "ratio to float file", "unpacked (--no-pack) MB",
                        "bit-identical reload"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
