"""Deployment speed of W8A8 DeiT-tiny on the CPU: vitq's exports beside the runtimes' own int8 quantization.

One process, the same evaluation images and the same threads for every engine: onnxruntime (float, vitq's QDQ
exports, ``--format onnxruntime`` for ``percentile``, ``--deploy onnxruntime`` for the reparameterized methods,
its own ``quantize_static`` and ``quantize_dynamic``) and OpenVINO (float, NNCF's int8 with
``model_type=TRANSFORMER``, vitq's IR exports with ``--deploy openvino`` and without). Each engine: top-1 on the
evaluation images of the first seed, batch-1 latency, batch-32 throughput (medians over interleaved rounds) and
file size. A second table pairs, for every seed, our fake-quant top-1 with the OpenVINO IR's and NNCF's (each
calibrated on that seed's calibration images).

    python benchmarks/deploy_speed.py --threads 2 --out benchmarks/results/deploy_speed.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import comma_list, deit_tiny_split, median_seconds, report_header, write_report

import vitq
from vitq.config import PointOverride
from vitq.errors import VitqError
from vitq.eval.ort import OrtModel
from vitq.eval.ov import OpenVinoModel
from vitq.export.onnx import export_onnx
from vitq.export.openvino import export_openvino
from vitq.export.ort import export_onnxruntime
from vitq.report.tables import markdown_table

UNIFORM_SOFTMAX_TEXT = "*attn.softmax=uniform:8"
UNIFORM_SOFTMAX = PointOverride.parse(UNIFORM_SOFTMAX_TEXT)
CPU_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
CALIB = 32


def cpu_flags() -> str:
    """The CPU features that decide which int8/bf16 kernels the runtimes pick."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in CPU_FLAGS)


def top1(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(images[i:i + 64]).argmax(1) for i in range(0, len(images), 64)])
    return 100.0 * (predictions == labels).float().mean().item()


def target_config(method: str, seed: int, deploy: str | None) -> vitq.QuantConfig:
    return vitq.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=CALIB, seed=seed, deploy=deploy)


def nncf_int8(float_onnx: Path, calib: torch.Tensor, out: Path) -> Path:
    """NNCF's post-training int8 quantization of the float model (transformer preset, our calibration images)."""
    import nncf
    import openvino as ov

    dataset = nncf.Dataset([calib[i:i + 1].numpy() for i in range(len(calib))])
    quantized = nncf.quantize(ov.convert_model(str(float_onnx)), dataset, model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(calib))
    ov.save_model(quantized, str(out / "model.xml"), compress_to_fp16=False)
    return out


def ort_static(float_onnx: Path, calib: torch.Tensor, path: Path) -> Path:
    """onnxruntime's own static QDQ quantization (per-channel weights, percentile calibration)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calib[i:i + 1].numpy()} for i in range(len(calib))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_onnx), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.Percentile)
    return path


def openvino_float(float_onnx: Path, out: Path) -> Path:
    """The float ONNX converted by OpenVINO (no quantization)."""
    import openvino as ov

    out.mkdir()
    ov.save_model(ov.convert_model(str(float_onnx)), str(out / "model.xml"), compress_to_fp16=False)
    return out


def open_engine(runtime: str, path: Path, threads: int) -> torch.nn.Module:
    return OrtModel(path, threads=threads) if runtime == "onnxruntime" else OpenVinoModel(path, threads=threads)


def timings(engines: dict[str, torch.nn.Module], images: torch.Tensor, args) -> dict[str, tuple[float, float]]:
    """Batch-1 latency (s) and batch-``args.batch`` throughput (images/s) of every engine: the median over
    ``args.rounds`` rounds, each timing every engine in turn, so that a slow phase of the machine is shared."""
    batch1, batch_n = images[:1], images[:args.batch]
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            latency = median_seconds(lambda engine=engine: engine(batch1), args.runs)
            seconds = median_seconds(lambda engine=engine: engine(batch_n), args.runs_batch)
            rounds[name].append((latency, args.batch / seconds))
    return {name: (statistics.median(r[0] for r in values), statistics.median(r[1] for r in values))
            for name, values in rounds.items()}


def file_mb(path: Path) -> float:
    files = [path / "model.xml", path / "model.bin"] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", type=comma_list(str), default=["percentile", "repq-vit", "erq", "adalog"],
                        help="vitq methods exported with --deploy openvino")
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2], help="seeds of the paired top-1 table")
    parser.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and OpenVINO threads")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=150, help="batch-1 calls timed per engine and round")
    parser.add_argument("--runs-batch", type=int, default=5, help="large-batch calls timed per engine and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing every engine in turn")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy_speed.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = Path(tempfile.mkdtemp(prefix="deploy_speed_"))
    rows, paired = [], []
    for seed in args.seeds:
        model, calib, (images, labels) = deit_tiny_split(CALIB, seed, None)
        float_onnx = tmp / f"float_{seed}.onnx"
        export_onnx(vitq.prepare(model, vitq.QuantConfig(method="float")), float_onnx)
        # name -> (runtime, file, fake-quant top-1, points not on the runtime's integer kernels)
        engines: dict[str, tuple[str, Path, float | None, int | None]] = {}
        if seed == args.seeds[0]:
            plain = vitq.quantize(model, target_config("percentile", seed, None), calib, progress=False)
            plain_top1 = top1(plain, images, labels)
            plain_onnx = export_onnx(plain, tmp / "vitq_percentile.onnx")
            quantize_dynamic(str(float_onnx), str(tmp / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
            engines["ORT float"] = ("onnxruntime", float_onnx, None, None)
            engines["ORT, vitq `percentile` QDQ export"] = ("onnxruntime", plain_onnx.path, plain_top1,
                                                           len(plain_onnx.float_points))
            engines["ORT, vitq `percentile` `--format onnxruntime`"] = (
                "onnxruntime", export_onnxruntime(plain, tmp / "vitq_percentile_ort.onnx").path, plain_top1,
                len(plain_onnx.float_points))
            for method in [m for m in args.methods if m != "percentile"]:
                for softmax in (False, True):  # the method's softmax quantizer, or 8-bit uniform (integer)
                    config = target_config(method, seed, "onnxruntime")
                    if softmax:
                        config = config.model_copy(update={"overrides": [UNIFORM_SOFTMAX]})
                    qmodel = vitq.quantize(model, config, calib, progress=False)
                    exported = export_onnx(qmodel, tmp / f"vitq_{method}_{softmax}.onnx")
                    if softmax and not any(p.role == "softmax" for p in exported.points):
                        continue
                    name = f"ORT, vitq `{method}` `--deploy onnxruntime`" + (
                        f" `--override '{UNIFORM_SOFTMAX_TEXT}'`" if softmax else "")
                    engines[name] = ("onnxruntime", exported.path, top1(qmodel, images, labels),
                                     len(exported.float_points))
                    if not exported.float_points:
                        break  # already all integer: the override would only change the method
            engines["ORT `quantize_static` (percentile)"] = (
                "onnxruntime", ort_static(float_onnx, calib, tmp / "ort_static.onnx"), None, None)
            engines["ORT `quantize_dynamic`"] = ("onnxruntime", tmp / "ort_dynamic.onnx", None, None)
            engines["OpenVINO float"] = ("openvino", openvino_float(float_onnx, tmp / "ov_float"), None, None)
            plain_ir = export_openvino(plain, tmp / "ov_percentile_plain")
            engines["OpenVINO, vitq `percentile` (no `--deploy`)"] = (
                "openvino", plain_ir.xml.parent, plain_top1, len(plain_ir.slow_points))
        nncf_ir = nncf_int8(float_onnx, calib, tmp / f"nncf_{seed}")
        nncf_top1 = top1(open_engine("openvino", nncf_ir, args.threads), images, labels)
        engines["OpenVINO + NNCF int8 (transformer preset)"] = ("openvino", nncf_ir, None, None)
        for method in args.methods:
            try:
                qmodel = vitq.quantize(model, target_config(method, seed, "openvino"), calib, progress=False)
                ir = export_openvino(qmodel, tmp / f"ov_{method}_{seed}")
            except VitqError as err:
                print(f"{method}: does not export: {err}")
                continue
            fake = top1(qmodel, images, labels)
            deployed = top1(open_engine("openvino", ir.xml.parent, args.threads), images, labels)
            paired.append([method, seed, f"{fake:.2f}", f"{deployed:.2f}", f"{deployed - fake:+.2f}",
                           f"{nncf_top1:.2f}", f"{deployed - nncf_top1:+.2f}", str(len(ir.slow_points))])
            engines[f"OpenVINO, vitq `{method}` `--deploy openvino`"] = ("openvino", ir.xml.parent, fake,
                                                                         len(ir.slow_points))
        if seed != args.seeds[0]:
            continue
        opened = {name: open_engine(runtime, path, args.threads) for name, (runtime, path, *_) in engines.items()}
        accuracy = {name: top1(engine, images, labels) for name, engine in opened.items()}
        for name, (latency, throughput) in timings(opened, images, args).items():
            runtime, path, fake, slow = engines[name]
            rows.append([name, runtime, f"{accuracy[name]:.2f}", "" if fake is None else f"{fake:.2f}",
                         f"{latency * 1000:.2f}", f"{throughput:.0f}", f"{file_mb(path):.1f}",
                         "" if slow is None else str(slow)])
            print(rows[-1], flush=True)
    gaps = {}
    for method, _seed, fake, deployed, *_ in paired:
        gaps.setdefault(method, []).append(abs(float(deployed) - float(fake)))
    n_eval = len(labels)
    write_report(args.out, [
        *report_header(
            "Deployment speed: W8A8 DeiT-tiny on CPU runtimes",
            f"- images: {n_eval} evaluation images (top-1), {CALIB} calibration images of the same seeded split for "
            f"every int8 model (vitq, onnxruntime `quantize_static`, NNCF); speed table: seed {args.seeds[0]}",
            f"- latency: median of {args.runs} batch-1 calls; throughput: median of {args.runs_batch} "
            f"batch-{args.batch} calls, after 2 warm-up calls; real evaluation images; each the median of "
            f"{args.rounds} rounds that time every engine in turn",
            f"- threads: {args.threads} (torch, onnxruntime intra-op, OpenVINO `INFERENCE_NUM_THREADS`); OpenVINO "
            f"CPU plugin defaults otherwise (latency hint, its default inference precision)",
            f"- onnxruntime {__import__('onnxruntime').__version__}, OpenVINO {__import__('openvino').__version__}, "
            f"NNCF {__import__('nncf').__version__}",
            f"- CPU flags: {cpu_flags()}"),
        markdown_table(["engine", "runtime", "top-1 %", "fake-quant top-1 %", "batch-1 ms",
                        f"batch-{args.batch} img/s", "file MB", "points off the int8 kernels"], rows),
        "",
        "`points off the int8 kernels`: onnxruntime, the points left on a float path; OpenVINO, the points its int8 "
        "kernels do not take (float paths, weights with zero points, unsigned q/k, quantized v/softmax).",
        "",
        "## Exported vs fake-quant vs NNCF, per seed",
        "",
        "Each seed draws its own calibration images (and so its own evaluation images); NNCF is calibrated on the "
        "same images. `slow points`: points of the IR that OpenVINO's int8 kernels do not take.",
        "",
        markdown_table(["method (`--deploy openvino`)", "seed", "fake-quant top-1 %", "OpenVINO top-1 %",
                        "gap", "NNCF top-1 %", "vs NNCF", "slow points"], paired),
        "",
        "Mean |OpenVINO − fake-quant| over the seeds: "
        + ", ".join(f"`{m}` {np.mean(g):.2f}" for m, g in gaps.items()),
        "",
    ])


if __name__ == "__main__":
    main()
