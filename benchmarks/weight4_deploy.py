"""4-bit weights that run: DeiT-tiny with packed 4-bit weights in onnxruntime (``MatMulNBits``), beside float,
our int8 and onnxruntime's own 4-bit and int8 quantizers.

Two tables, one process, the same threads for every engine:

1. **agreement**, every seed: the fake-quant top-1 of each W4 model and the top-1 of its
   ``--format onnxruntime --packed-weights`` file (MatMulNBits computing in fp32, and with ``--nbits-accuracy
   int8``), on the same evaluation images;
2. **speed and size**, first seed: batch-1 latency, batch-32 throughput (medians over interleaved rounds), file
   size and top-1 of onnxruntime's float model, our int8 (``percentile`` W8A8 ``--format onnxruntime``), the W4
   models with 4-bit weights stored as int8 codes and packed, onnxruntime's own ``MatMulNBitsQuantizer``
   (round-to-nearest 4-bit weights, blocks of 32, on the float ONNX; needs ``pip install onnx-ir``) and its
   ``quantize_dynamic`` (int8).

    python benchmarks/weight4_deploy.py --threads 2 --out benchmarks/results/weight4_deploy.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import onnx
import torch
from common import append_journal, comma_list, deit_tiny_split, journal_records, report_header, write_report
from deploy_speed import CALIB, cpu_flags, file_mb, timings, top1

import vitq
from vitq.eval.ort import OrtModel
from vitq.export.onnx import export_onnx
from vitq.export.ort import export_onnxruntime
from vitq.report.tables import markdown_table

#: label -> (method, w_bits, a_bits, deploy, options): the W4 models measured
MODELS = {"percentile W4A16 (round-to-nearest)": ("percentile", 4, 16, None, {}),
          "gptq W4A16": ("gptq", 4, 16, None, {}),
          "gptq W4A16, groups of 32": ("gptq", 4, 16, None, {"group_size": 32}),
          "percentile W4A8": ("percentile", 4, 8, "onnxruntime", {})}
COMPUTE = {"fp32": "MatMulNBits fp32", "int8": "MatMulNBits int8"}


def quantized(model, calib, label: str, seed: int):
    method, w_bits, a_bits, deploy, options = MODELS[label]
    config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=CALIB, seed=seed, deploy=deploy,
                              options=options)
    return vitq.quantize(model, config, calib, progress=False)


def agreement(args, tmp: Path) -> list[dict]:
    """Fake-quant and onnxruntime top-1 of every model and seed (journalled: a rerun skips the finished ones)."""
    records = journal_records(args.journal)
    done = {(r["model"], r["seed"]) for r in records}
    for seed in args.seeds:
        model, calib, (images, labels) = deit_tiny_split(CALIB, seed, args.images)
        for label in MODELS:
            if (label, seed) in done:
                continue
            qmodel = quantized(model, calib, label, seed)
            record = {"model": label, "seed": seed, "n_images": len(labels),
                      "fake_quant": top1(qmodel, images, labels)}
            for accuracy in COMPUTE:
                path = export_onnxruntime(qmodel, tmp / f"{accuracy}.onnx", packed_weights=True,
                                          accuracy=accuracy).path
                record[accuracy] = top1(OrtModel(path, threads=args.threads), images, labels)
            append_journal(args.journal, record)
            records.append(record)
            print(record, flush=True)
    return records


def ort_nbits(float_onnx: Path, path: Path) -> Path:
    """onnxruntime's own 4-bit weight quantization: round-to-nearest, asymmetric, blocks of 32."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(float_onnx)), bits=4, block_size=32, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)
    return path


def speed(args, tmp: Path) -> list[list]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    seed = args.seeds[0]
    model, calib, (images, labels) = deit_tiny_split(CALIB, seed, args.images)
    float_onnx = export_onnx(vitq.prepare(model, vitq.QuantConfig(method="float")), tmp / "float.onnx").path
    int8 = vitq.quantize(model, vitq.QuantConfig(method="percentile", calib_size=CALIB, seed=seed), calib,
                         progress=False)
    engines = {"ORT float": float_onnx,
               "vitq int8: `percentile` W8A8 `--format onnxruntime`": export_onnxruntime(int8, tmp / "w8a8.onnx").path}
    for label in MODELS:
        qmodel = quantized(model, calib, label, seed)
        stem = label.split(" (")[0].replace(" ", "_").replace(",", "")
        engines[f"{label}, weights as int8 codes"] = export_onnxruntime(qmodel, tmp / f"{stem}_codes.onnx").path
        for accuracy, name in COMPUTE.items():
            engines[f"{label}, packed, {name}"] = export_onnxruntime(
                qmodel, tmp / f"{stem}_{accuracy}.onnx", packed_weights=True, accuracy=accuracy).path
    engines["ORT `MatMulNBitsQuantizer` W4 (RTN, block 32)"] = ort_nbits(float_onnx, tmp / "ort_nbits.onnx")
    quantize_dynamic(str(float_onnx), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8)
    engines["ORT `quantize_dynamic` (int8)"] = tmp / "dynamic.onnx"
    opened = {name: OrtModel(path, threads=args.threads) for name, path in engines.items()}
    accuracy = {name: top1(engine, images, labels) for name, engine in opened.items()}
    rows = []
    for name, (latency, throughput) in timings(opened, images, args).items():
        rows.append([name, f"{accuracy[name]:.2f}", f"{latency * 1000:.2f}", f"{throughput:.0f}",
                     f"{file_mb(engines[name]):.2f}"])
        print(rows[-1], flush=True)
    return rows


def agreement_rows(records: list[dict]) -> list[list]:
    rows = []
    for label in MODELS:
        mine = sorted((r for r in records if r["model"] == label), key=lambda r: r["seed"])
        for r in mine:
            rows.append([label, r["seed"], f"{r['fake_quant']:.2f}",
                         *(f"{r[a]:.2f} ({r[a] - r['fake_quant']:+.2f})" for a in COMPUTE)])
        rows.append([f"**{label}: mean |gap|**", f"{len(mine)} seeds", "",
                     *(f"{statistics.mean(abs(r[a] - r['fake_quant']) for r in mine):.2f}" for a in COMPUTE)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=None, help="evaluation images per seed (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=100, help="batch-1 calls timed per engine and round")
    parser.add_argument("--runs-batch", type=int, default=5, help="large-batch calls timed per engine and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timing every engine in turn")
    parser.add_argument("--journal", type=Path, default=Path("benchmarks/results/weight4_deploy.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/weight4_deploy.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="weight4_"))
    records = agreement(args, tmp)
    speed_rows = speed(args, tmp)
    n_images = records[0]["n_images"]
    write_report(args.out, [
        *report_header(
            "4-bit weights in onnxruntime: DeiT-tiny W4A16 / W4A8 with packed weights (`MatMulNBits`)",
            f"- images: {n_images} evaluation images per seed, {CALIB} calibration images (disjoint); seeds "
            f"{', '.join(map(str, args.seeds))} (agreement), {args.seeds[0]} (speed)",
            f"- latency: median of {args.runs} batch-1 calls; throughput: median of {args.runs_batch} "
            f"batch-{args.batch} calls, after 2 warm-up calls; each the median of {args.rounds} rounds that time "
            "every engine in turn",
            f"- threads: {args.threads} (torch, onnxruntime intra-op); onnxruntime "
            f"{__import__('onnxruntime').__version__}",
            f"- CPU flags: {cpu_flags()}"),
        "## Agreement: fake-quant top-1 vs the packed file in onnxruntime",
        "",
        markdown_table(["model", "seed", "fake-quant top-1 %", "packed, fp32 top-1 % (gap)",
                        "packed, int8 compute top-1 % (gap)"], agreement_rows(records)),
        "",
        "## Speed and size (first seed)",
        "",
        markdown_table(["engine", "top-1 %", "batch-1 ms", f"batch-{args.batch} img/s", "file MB"], speed_rows),
        "",
        "`packed`: `vitq export --format onnxruntime --packed-weights` (every Linear a `MatMulNBits` with 4-bit "
        "codes; the patch-embedding convolution keeps int8 codes); `int8 compute`: with `--nbits-accuracy int8`. "
        "`weights as int8 codes`: the same model written without `--packed-weights`.",
        "",
    ])


if __name__ == "__main__":
    main()
