"""Which onnxruntime graph of a vitq W8A8 DeiT-tiny runs fastest at equal accuracy.

One vitq model (`percentile` W8A8, 32 calibration images, seed 0) written as several graphs, all run by
onnxruntime in one process on the same evaluation images and threads: the standard QDQ export, that graph
through onnxruntime's transformer optimizer (``model_type="vit"``), onnxruntime's own extended-level fusions
saved ahead of time, ``--format onnxruntime`` (those fusions plus biases folded into the integer GEMMs), the same
with the attention points (q, k, v, softmax) left float, a fused ``MultiHeadAttention`` contrib op for the float
attention, and the tanh approximation of GELU (``FastGelu``). Each: top-1 of the file, top-1 of its fake-quant
model, batch-1 latency and batch-32 throughput (medians over interleaved rounds), onnxruntime's float model and
its own ``quantize_static``/``quantize_dynamic`` beside them.

    python benchmarks/ort_graph.py --threads 2 --out benchmarks/results/ort_graph.md
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from common import deit_tiny_split, report_header, write_report
from deploy_speed import CALIB, cpu_flags, file_mb, ort_static, timings, top1

import vitq
from vitq.config import PointOverride
from vitq.eval.ort import OrtModel, open_session
from vitq.export.onnx import export_onnx
from vitq.export.ort import export_onnxruntime
from vitq.nn.attention import QuantAttention
from vitq.report.tables import markdown_table

ATTENTION_FLOAT = [PointOverride.parse(f"*attn.{point}=float") for point in ("q", "k", "v", "softmax")]


class _MultiHeadAttention(torch.autograd.Function):
    """Float multi-head attention over [B, N, C] q, k, v in torch; onnxruntime's ``MultiHeadAttention`` in ONNX."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int, scale: float):
        B, N, C = q.shape
        q, k, v = (t.reshape(B, N, heads, C // heads).transpose(1, 2) for t in (q, k, v))
        return (((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        return g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads, scale_f=scale)


@contextmanager
def fused_attention() -> Iterator[None]:
    """Trace every ``QuantAttention`` (its q/k/v/softmax points float) as one ``MultiHeadAttention`` op."""

    def forward(self, x, attn_mask=None, is_causal=False):
        q, k, v = self.qkv(x).split(self.attn_dim, -1)
        return self.proj_drop(self.proj(_MultiHeadAttention.apply(q, k, v, self.num_heads, float(self.scale))))

    original = QuantAttention.forward
    QuantAttention.forward = forward
    try:
        yield
    finally:
        QuantAttention.forward = original


def transformer_optimizer(source: Path, target: Path) -> Path:
    """onnxruntime's transformer optimizer for ViT (DeiT-tiny: 3 heads of width 64)."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimize_model(str(source), model_type="vit", num_heads=3, hidden_size=192, opt_level=0).save_model_to_file(
        str(target))
    return target


def extended_fusions(source: Path, target: Path) -> Path:
    """onnxruntime's extended-level fusions, saved (``--format onnxruntime`` without the bias folding)."""
    open_session(source, optimization="extended", save_to=target)
    return target


def tanh_gelu(source: Path, target: Path) -> Path:
    """``BiasGelu`` (erf GELU) replaced by ``FastGelu`` (tanh approximation, same inputs)."""
    model = onnx.load(str(source))
    for node in model.graph.node:
        if node.op_type == "BiasGelu":
            node.op_type = "FastGelu"
    onnx.save(model, str(target))
    return target


def count_ops(path: Path, ops: tuple[str, ...]) -> str:
    nodes = [node.op_type for node in onnx.load(str(path)).graph.node]
    return ", ".join(f"{nodes.count(op)} {op}" for op in ops if op in nodes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--runs", type=int, default=100, help="batch-1 calls timed per engine and round")
    parser.add_argument("--runs-batch", type=int, default=5, help="large-batch calls timed per engine and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of timing every engine in turn")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ort_graph.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = Path(tempfile.mkdtemp(prefix="ort_graph_"))
    model, calib, (images, labels) = deit_tiny_split(CALIB, args.seed, None)
    config = vitq.QuantConfig(method="percentile", w_bits=8, a_bits=8, calib_size=CALIB, seed=args.seed)
    float_onnx = tmp / "float.onnx"
    export_onnx(vitq.prepare(model, vitq.QuantConfig(method="float")), float_onnx)
    qmodel = vitq.quantize(model, config, calib, progress=False)
    attention_float = vitq.quantize(model, config.model_copy(update={"overrides": ATTENTION_FLOAT}), calib,
                                    progress=False)
    fake, fake_attention_float = top1(qmodel, images, labels), top1(attention_float, images, labels)
    qdq = export_onnx(qmodel, tmp / "qdq.onnx").path
    ort_format = export_onnxruntime(qmodel, tmp / "ort.onnx").path
    with fused_attention():
        mha = export_onnxruntime(attention_float, tmp / "mha.onnx").path
    quantize_dynamic(str(float_onnx), str(tmp / "dynamic.onnx"), weight_type=QuantType.QInt8)
    # name -> (file, fake-quant top-1 of the model it computes)
    engines: dict[str, tuple[Path, float | None]] = {
        "ORT float": (float_onnx, None),
        "`--format onnx` (QDQ)": (qdq, fake),
        "QDQ + onnxruntime transformer optimizer (`model_type=vit`)": (
            transformer_optimizer(qdq, tmp / "transformers.onnx"), fake),
        "QDQ + onnxruntime's extended fusions, saved": (extended_fusions(qdq, tmp / "extended.onnx"), fake),
        "`--format onnxruntime` (extended fusions + biases in the integer GEMMs)": (ort_format, fake),
        "`--format onnxruntime`, attention float (`*attn.{q,k,v,softmax}=float`)": (
            export_onnxruntime(attention_float, tmp / "ort_attention_float.onnx").path, fake_attention_float),
        "`--format onnxruntime`, attention float as one `MultiHeadAttention`": (mha, fake_attention_float),
        "`--format onnxruntime` + tanh GELU (`FastGelu`)": (tanh_gelu(ort_format, tmp / "fast_gelu.onnx"), fake),
        "ORT `quantize_static` (percentile)": (ort_static(float_onnx, calib, tmp / "static.onnx"), None),
        "ORT `quantize_dynamic`": (tmp / "dynamic.onnx", None),
    }
    opened = {name: OrtModel(path, threads=args.threads) for name, (path, _) in engines.items()}
    accuracy = {name: top1(engine, images, labels) for name, engine in opened.items()}
    ops = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMul", "MultiHeadAttention", "Add", "QuantizeLinear",
           "BiasGelu", "FastGelu", "SkipLayerNormalization")
    rows = []
    for name, (latency, throughput) in timings(opened, images, args).items():
        path, fake_top1 = engines[name]
        rows.append([name, f"{accuracy[name]:.2f}", "" if fake_top1 is None else f"{fake_top1:.2f}",
                     f"{latency * 1000:.2f}", f"{throughput:.0f}", f"{file_mb(path):.1f}", count_ops(path, ops)])
        print(rows[-1], flush=True)
    write_report(args.out, [
        *report_header(
            "onnxruntime graph placements: W8A8 DeiT-tiny (`percentile`)",
            f"- images: {len(labels)} evaluation images (top-1), {CALIB} calibration images, seed {args.seed}",
            f"- latency: median of {args.runs} batch-1 calls; throughput: median of {args.runs_batch} "
            f"batch-{args.batch} calls, after 2 warm-up calls; each the median of {args.rounds} rounds that time "
            "every graph in turn",
            f"- threads: {args.threads} (torch, onnxruntime intra-op); onnxruntime "
            f"{__import__('onnxruntime').__version__}, loaded at its default optimisation level (all)",
            f"- CPU flags: {cpu_flags()}"),
        markdown_table(["graph", "top-1 %", "fake-quant top-1 %", "batch-1 ms", f"batch-{args.batch} img/s",
                        "file MB", "nodes in the file"], rows),
        "",
        "`fake-quant top-1`: the vitq model the graph computes (attention float: the model quantized with those "
        "points float). `nodes in the file`: as written, before onnxruntime's load-time fusions.",
        "",
    ])


if __name__ == "__main__":
    main()
