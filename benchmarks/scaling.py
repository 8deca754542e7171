"""Scaling: processes, devices and the agreement of GPU and CPU predictions.

    python benchmarks/scaling.py processes --out benchmarks/results/scaling_processes.md
    python benchmarks/scaling.py methods --device cpu --out-dir benchmarks/results/scaling_methods_cpu --resume
    python benchmarks/scaling.py methods --device cuda --out-dir benchmarks/results/scaling_methods_cuda
    python benchmarks/scaling.py agreement --device cpu --save preds_cpu.json
    python benchmarks/scaling.py agreement --device cuda --save preds_cuda.json
    python benchmarks/scaling.py agree preds_cpu.json preds_cuda.json --out benchmarks/results/scaling_agreement.md

``processes``: evaluation images/s of one process against two (``torchrun --nproc-per-node 2 -m vitq eval``) on
this machine, in one run: the same images, the same total number of threads. ``methods``: calibration and
evaluation seconds of every registered method at W4A4 (``vitq compare`` under the hood, so the run journal makes
it resumable). ``agreement``: the predicted class of every evaluation image for ``percentile`` W8A8, ``erq``
W4A4, ``adalog`` W4A4 and ``dopq-vit --reconstruct`` W4A4, saved on one device and compared on another (TF32
off: a code on a rounding boundary may flip under any change of float arithmetic, so the bar is the share of
images with the same class, not equality). The peak memory of streaming evaluation is measured by
``benchmarks/stream_memory.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import report_header, write_report

from vitq.experiment import RunSpec
from vitq.experiment.compare import CompareSpec, run_compare
from vitq.experiment.runs import ConfigRequest, quantize_on_split
from vitq.files import write_json
from vitq.methods import method_names
from vitq.report.runinfo import machine_summary

#: the configurations whose GPU and CPU predictions are compared: (label, method, w_bits, a_bits, reconstruct)
AGREEMENT = [("percentile W8A8", "percentile", 8, 8, False), ("erq W4A4", "erq", 4, 4, False),
             ("adalog W4A4", "adalog", 4, 4, False), ("dopq-vit --reconstruct W4A4", "dopq-vit", 4, 4, True)]


def no_tf32() -> None:
    """Float32 matmuls and convolutions in full float32 on the GPU (torch's default for matmuls; made explicit)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ---------------------------------------------------------------- processes


def _eval_json(command: list[str], env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "eval.json"
        subprocess.run([*command, "--json", str(out)], check=True, env=env)
        return json.loads(out.read_text())


def cmd_processes(args: argparse.Namespace) -> None:
    """One process with all threads, one with one thread, and ``--nproc`` processes with one thread each."""
    common = ["eval", "--method", args.method, "--w-bits", "8", "--a-bits", "8", "--calib-size", str(args.calib_size),
              "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--device", "cpu", "--no-progress",
              "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    threads = args.nproc
    runs = [("1 process", threads, [sys.executable, "-m", "vitq", *common, "--threads", str(threads)]),
            ("1 process", 1, [sys.executable, "-m", "vitq", *common, "--threads", "1"]),
            (f"{args.nproc} processes (torchrun)", 1,
             [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
              "-m", "vitq", *common, "--threads", "1"])]
    rows, base = [], None
    for name, per_process, command in runs:
        record = _eval_json(command, env)
        base = base or record["images_per_s"]
        rows.append(f"| {name} | {per_process} | {record['n_images']} | {record['top1']:.2f} | "
                    f"{record['images_per_s']:.1f} | {record['images_per_s'] / base:.2f}x |")
    lines = report_header(
        f"Evaluation throughput: one process vs {args.nproc} (torchrun, gloo)",
        f"- model: DeiT-tiny, `{args.method}` W8A8 calibrated on {args.calib_size} images (seed 0) by rank 0",
        f"- evaluation: the first {args.limit} evaluation images, batch {args.batch_size}, images decoded in the "
        "evaluating process (`--workers 0`)")
    lines += ["| run | threads per process | images | top-1 % | images/s | vs the first row |",
              "| --- | ---: | ---: | ---: | ---: | ---: |", *rows]
    write_report(args.out, lines)


# ---------------------------------------------------------------- methods


def cmd_methods(args: argparse.Namespace) -> None:
    """Every registered method at W4A4 through the compare engine (journaled, ``--resume`` goes on)."""
    if args.device.startswith("cuda"):
        no_tf32()
    methods = args.methods or ",".join(name for name in method_names() if name != "float")
    spec = RunSpec.resolve(progress=not args.no_progress, device=args.device, limit=args.limit,
                           batch_size=args.batch_size)
    compare = CompareSpec(methods=methods, bits="W4A4", seeds="0", request=ConfigRequest(calib_size=args.calib_size),
                          out_dir=args.out_dir, resume=args.resume, command=f"python {' '.join(sys.argv)}")
    start = time.perf_counter()
    outcome = run_compare(spec, compare)
    print(f"wrote {', '.join(str(p) for p in outcome.paths.values())} in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------- agreement


def predictions(label: str, method: str, w_bits: int, a_bits: int, reconstruct: bool, spec: RunSpec,
                calib_size: int) -> tuple[list[int], float]:
    """Predicted classes on the evaluation images of seed 0, and the calibration seconds."""
    request = ConfigRequest(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=calib_size, seed=0,
                            reconstruct=reconstruct)
    config = request.build()
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(config.calib_size, config.seed, spec.limit)
    qmodel, seconds = quantize_on_split(model, spec.model, config, cache, split, progress=spec.progress,
                                        inplace=True)
    images, _ = cache.tensors(split.eval)
    device = next(qmodel.parameters()).device
    with torch.no_grad():
        classes = [qmodel(batch.to(device)).argmax(dim=1).cpu() for batch in images.split(spec.batch_size)]
    print(f"{label} on {device}: calibrated in {seconds:.1f} s", flush=True)
    return torch.cat(classes).tolist(), seconds


def cmd_agreement(args: argparse.Namespace) -> None:
    """Save this device's predicted classes (and the true ones) for every :data:`AGREEMENT` configuration."""
    if args.device.startswith("cuda"):
        no_tf32()
    spec = RunSpec.resolve(progress=not args.no_progress, device=args.device, limit=args.limit,
                           batch_size=args.batch_size)
    cache = spec.image_cache(spec.float_model())
    labels = cache.tensors(cache.split(args.calib_size, 0, args.limit).eval)[1].tolist()
    chosen = [row for row in AGREEMENT if not args.only or row[0] in args.only]
    runs = {}
    for row in chosen:
        classes, seconds = predictions(*row, spec=spec, calib_size=args.calib_size)
        runs[row[0]] = {"classes": classes, "calib_seconds": seconds}
        write_json(args.save, {"device": spec.device, "machine": machine_summary(), "threads": torch.get_num_threads(),
                               "limit": args.limit, "calib_size": args.calib_size, "labels": labels, "runs": runs})


def cmd_agree(args: argparse.Namespace) -> None:
    """The agreement table of two files written by ``agreement --save`` (on the same images)."""
    a, b = (json.loads(path.read_text()) for path in (args.a, args.b))
    if a["labels"] != b["labels"]:
        raise SystemExit("the two files hold predictions for different images")
    labels = torch.tensor(a["labels"])
    rows = []
    for label in [name for name in a["runs"] if name in b["runs"]]:
        ra, rb = a["runs"][label], b["runs"][label]
        ca, cb = torch.tensor(ra["classes"]), torch.tensor(rb["classes"])
        rows.append(f"| {label} | {len(ca)} | {(ca == labels).float().mean().item() * 100:.2f} | "
                    f"{(cb == labels).float().mean().item() * 100:.2f} | {(ca == cb).float().mean().item() * 100:.2f} "
                    f"| {int((ca != cb).sum())} | {ra['calib_seconds']:.1f} | {rb['calib_seconds']:.1f} |")
    da, db = a["device"], b["device"]
    lines = report_header(
        f"Agreement of {da} and {db} predictions",
        f"- model: DeiT-tiny; calibration: {a['calib_size']} images, seed 0; evaluation: {len(labels)} images; TF32 "
        "off on the GPU",
        f"- {da}: {a['machine']}, {a['threads']} threads", f"- {db}: {b['machine']}, {b['threads']} threads")
    lines += [f"| configuration | images | top-1 % {da} | top-1 % {db} | same class % | images differing | "
              f"calibration s {da} | calibration s {db} |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows]
    write_report(args.out, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("processes")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--method", default="percentile")
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling_processes.md"))
    p.set_defaults(run=cmd_processes)
    for name, run in (("methods", cmd_methods), ("agreement", cmd_agreement)):
        p = sub.add_parser(name)
        p.add_argument("--device", default="auto")
        p.add_argument("--calib-size", type=int, default=32)
        p.add_argument("--limit", type=int, default=None, help="evaluate only the first N evaluation images")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(run=run)
    sub.choices["methods"].add_argument("--methods", help="comma list (default: every method but float)")
    sub.choices["methods"].add_argument("--out-dir", type=Path, required=True)
    sub.choices["methods"].add_argument("--resume", action="store_true")
    sub.choices["agreement"].add_argument("--only", action="append", help="one of the configuration labels")
    sub.choices["agreement"].add_argument("--save", type=Path, required=True,
                                          help="write this device's predictions here (after every configuration)")
    p = sub.add_parser("agree", help="the agreement table of two --save files")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling_agreement.md"))
    p.set_defaults(run=cmd_agree)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
