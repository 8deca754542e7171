"""CPU inference speed of DeiT-tiny: torch eager float, onnxruntime float, our int8 QDQ export, ORT dynamic int8.

All four run in one process on the same machine, one after the other, so the ratios are comparable even on
a noisy machine. Latency: batch 1, median of ``--runs`` calls; throughput: batch 32, median of
``--runs-batch`` calls. Ratios are to onnxruntime float. A per-operator profile (onnxruntime's profiler,
batch 32) of the float and int8 graphs shows where the time goes.

    python benchmarks/speed.py --threads 2 --out benchmarks/results/speed.md
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import deit_tiny_split, median_seconds, report_header, write_report

import vitq
from vitq.eval.ort import open_session, session_options
from vitq.export.onnx import export_onnx
from vitq.report.tables import markdown_table


def ort_runner(session, images: np.ndarray) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: images})


def op_profile(path: Path, images: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """Milliseconds per call spent in each onnxruntime operator type (after graph optimisation)."""
    import onnxruntime as ort

    options = session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        run = ort_runner(session, images)
        run()  # warm-up call, profiled too: subtracted below by counting calls
        for _ in range(repeats):
            run()
        trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / (repeats + 1)
    return dict(per_op)


def profile_table(profiles: dict[str, dict[str, float]], top: int) -> str:
    ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0) for p in
                                                                                  profiles.values()))[:top]
    rows = [[op, *(f"{p[op]:.1f}" if op in p else "" for p in profiles.values())] for op in ops]
    rows.append(["**total (kernels)**", *(f"{sum(p.values()):.1f}" for p in profiles.values())])
    return markdown_table(["operator", *(f"{name} ms/batch" for name in profiles)], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="percentile", help="quantization method of the int8 model")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=30, help="batch-1 calls timed per engine")
    parser.add_argument("--runs-batch", type=int, default=5, help="large-batch calls timed per engine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, calib, (images, _) = deit_tiny_split(32, 0, args.batch)
    qmodel = vitq.quantize(model, vitq.QuantConfig(method=args.method, w_bits=8, a_bits=8), calib, progress=False)
    float_qmodel = vitq.prepare(model, vitq.QuantConfig(method="float"))
    with tempfile.TemporaryDirectory() as tmp:
        files = {"ORT float": Path(tmp) / "float.onnx", f"ORT int8 (vitq {args.method} W8A8)": Path(tmp) / "int8.onnx",
                 "ORT dynamic int8": Path(tmp) / "dynamic.onnx"}
        names = list(files)
        export_onnx(float_qmodel, files[names[0]])
        export_onnx(qmodel, files[names[1]])
        quantize_dynamic(str(files[names[0]]), str(files[names[2]]), weight_type=QuantType.QInt8)
        batch1, batch_n = images[:1].numpy(), images.numpy()
        timings: dict[str, tuple[float, float]] = {}
        model.eval()
        with torch.no_grad():
            timings["torch eager float"] = (median_seconds(lambda: model(images[:1]), args.runs),
                                            median_seconds(lambda: model(images), args.runs_batch))
        for name, path in files.items():
            session = open_session(path, args.threads)
            timings[name] = (median_seconds(ort_runner(session, batch1), args.runs),
                             median_seconds(ort_runner(session, batch_n), args.runs_batch))
        sizes = {name: path.stat().st_size for name, path in files.items()}
        profiles = {name: op_profile(files[name], batch_n, args.threads, args.runs_batch) for name in names[:2]}

    base_latency, base_batch = timings[names[0]]
    rows = []
    for name, (latency, batch_seconds) in timings.items():
        rows.append([name, f"{latency * 1000:.1f}", f"{base_latency / latency:.2f}x",
                     f"{args.batch / batch_seconds:.1f}", f"{base_batch / batch_seconds:.2f}x",
                     f"{sizes[name] / 1e6:.1f}" if name in sizes else ""])
    write_report(args.out, [
        *report_header(
            "Inference speed: DeiT-tiny on CPU",
            f"- int8 model: `{args.method}` W8A8 calibrated on 32 images (seed 0), exported by `vitq export`; "
            f"the float ONNX is the same explicit-attention graph without QDQ nodes",
            f"- inputs: real evaluation images; latency = median of {args.runs} batch-1 calls, throughput = "
            f"median of {args.runs_batch} batch-{args.batch} calls, after 2 warm-up calls",
            f"- onnxruntime {__import__('onnxruntime').__version__}, graph optimisation level all, "
            f"{args.threads} intra-op threads"),
        markdown_table(["engine", "batch-1 latency ms", "speed-up vs ORT float", f"batch-{args.batch} images/s",
                        "throughput vs ORT float", "file MB"], rows),
        "",
        f"## Where the time goes (onnxruntime profiler, batch {args.batch}, ms per batch)",
        "",
        profile_table(profiles, top=14),
        "",
    ])


if __name__ == "__main__":
    main()
