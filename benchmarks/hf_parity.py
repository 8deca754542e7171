"""The transformers path against the timm path on the real DeiT-tiny: same float logits, same quantized top-1.

Writes the shipped DeiT-tiny as a transformers folder (``vitq convert --to hf``), reads it back as ``hf:<folder>``,
checks that its float logits and its preprocessing equal the timm model's, then quantizes both on the same seeded
calibration images and evaluates both on the same evaluation images, per method setting and seed. Each result is
appended to a journal (``--journal``), so an interrupted run goes on where it stopped.

    python benchmarks/hf_parity.py --seeds 0,1,2 --out benchmarks/results/hf_parity.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import append_journal, comma_list, journal_records, report_header, write_report

import vitq
from vitq.experiment import RunSpec
from vitq.models.hf import write_hf_folder
from vitq.report.tables import markdown_table

CALIB = 32
SETTINGS = (("percentile", 8, 8), ("repq-vit", 4, 4), ("erq", 4, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/hf_parity.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hf_parity.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = RunSpec.resolve(progress=False)
    timm_model = spec.float_model()
    with tempfile.TemporaryDirectory() as folder:
        write_hf_folder(timm_model, folder)
        hf_model = vitq.create_model(f"hf:{folder}")
        run(args, spec, timm_model, hf_model)


def run(args, spec: RunSpec, timm_model, hf_model) -> None:
    caches = {"timm": spec.image_cache(timm_model), "hf": spec.image_cache(hf_model)}
    probe = caches["timm"].tensors(caches["timm"].split(CALIB, 0).calib)[0][:8]
    same_transform = torch.equal(caches["hf"].tensors(caches["hf"].split(CALIB, 0).calib)[0][:8], probe)
    with torch.no_grad():
        reference = timm_model(probe)
        logit_gap = float((hf_model(probe) - reference).abs().max() / reference.abs().max())
    done = {(r["method"], r["w_bits"], r["a_bits"], r["seed"]): r for r in journal_records(args.journal)}
    for method, w_bits, a_bits in SETTINGS:
        for seed in args.seeds:
            key = (method, w_bits, a_bits, seed)
            if key in done:
                continue
            config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=CALIB, seed=seed)
            record = {"method": method, "w_bits": w_bits, "a_bits": a_bits, "seed": seed}
            for path, model in (("timm", timm_model), ("hf", hf_model)):
                cache = caches[path]
                split = cache.split(CALIB, seed)
                qmodel = vitq.quantize(model, config, cache.tensors(split.calib)[0], progress=False)
                data = cache.tensors(split.eval)
                record[path] = vitq.evaluate(qmodel, data, progress=False).top1
                record["n_eval"] = len(data[1])
            done[key] = record
            append_journal(args.journal, record)
            print(json.dumps(record), flush=True)
    rows = []
    for method, w_bits, a_bits in SETTINGS:
        cells = [done[(method, w_bits, a_bits, s)] for s in args.seeds]
        gaps = [c["hf"] - c["timm"] for c in cells]
        rows.append([method, f"W{w_bits}A{a_bits}", " / ".join(f"{c['timm']:.2f}" for c in cells),
                     " / ".join(f"{c['hf']:.2f}" for c in cells), f"{statistics.mean(abs(g) for g in gaps):.2f}"])
    write_report(args.out, [
        *report_header(
            "DeiT-tiny through transformers (hf:) against timm: float logits and quantized top-1",
            f"- images: {cells[0]['n_eval']} evaluation images per seed, {CALIB} calibration images of the same "
            "seeded split, the same for both paths",
            f"- seeds: {', '.join(map(str, args.seeds))}",
            "- the hf: model is the shipped DeiT-tiny written by `vitq convert --to hf` and read back",
            f"- float logits, hf: vs timm, max |difference| / max |logit| on 8 images: {logit_gap:.2e}; "
            f"the same preprocessed pixels on those images: {'yes' if same_transform else 'NO'}"),
        markdown_table(["method", "setting", "timm top-1 % per seed", "hf: top-1 % per seed", "mean |gap|"], rows),
        "",
    ])


if __name__ == "__main__":
    main()
