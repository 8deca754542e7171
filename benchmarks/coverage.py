"""Which model families vitq quantizes: family x method on small random-initialised timm models.

For each family (a small config of one timm model: few blocks, random weights, nothing downloaded) and each
registered method at W8A8 (reconstruction methods with a 4-iteration budget): whether it runs, refuses (the
first line of the error) or fails with another exception (``error``: a bug to fix); the logit SQNR of the
quantized model against the float one on random images; whether the ``percentile`` W8A8 model exports to ONNX
(and how many points keep a float path) and whether the integer-only runtime compiles it. Random weights make
the SQNR a smoke check of the wiring (a broken adapter gives ~0 dB), not an accuracy claim. A second table runs
``percentile``, ``repq-vit``, ``gptq`` and ``erq`` on every family at ``--low-bits`` (W4A4); a third compares
``percentile``, ``repq-vit``, ``ptq4vit`` and ``q-hyvit`` on the hybrid CNN-ViTs at ``--hybrid-bits`` (6).

    python benchmarks/coverage.py --out benchmarks/results/coverage.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import comma_list, report_header, write_report

import vitq
from vitq.config import ReconConfig
from vitq.errors import VitqError
from vitq.export.integer_vit import IntegerViT
from vitq.export.onnx import export_onnx
from vitq.methods import method_class, method_names
from vitq.models.smoke import SMOKE_OPTIONS, build_smoke_model, smoke_configs, smoke_images
from vitq.report.tables import markdown_table

#: the hybrid CNN-ViT families, compared at a lower bit-width with the methods written or used for them
HYBRIDS = ("levit", "mobilevit", "mobilevitv2", "efficientvit_msra", "efficientvit_mit", "tinyvit")
HYBRID_METHODS = ("percentile", "repq-vit", "ptq4vit", "q-hyvit")
#: the methods every family must run at a low bit-width
LOW_BIT_METHODS = ("percentile", "repq-vit", "gptq", "erq")
RECON = ReconConfig(iterations=4, batch_size=2)


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:140]


def sqnr_db(reference: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.square().mean() / (out - reference).square().mean().clamp_min(1e-30)))


def family_row(label: str, name: str, model: torch.nn.Module, methods: list[str], images: int,
               bits: int = 8, options: dict[str, dict] | None = None) -> tuple[list, list]:
    """The summary row of one family (``model``: its small random model) and its per-method cells at ``bits``
    (weights and activations)."""
    x = smoke_images(model, images)
    with torch.no_grad():
        reference = model(x)
    cells, reasons, percentile = [], set(), None
    for method in methods:
        config = vitq.QuantConfig(method=method, w_bits=bits, a_bits=bits, calib_size=images,
                                  options=(options or {}).get(method, {}),
                                  reconstruct=RECON if method_class(method).reconstructs else None)
        try:
            qmodel = vitq.quantize(model, config, x, model_name=name, progress=False)
            with torch.no_grad():
                cells.append(f"{sqnr_db(reference, qmodel(x)):.0f}")
            percentile = qmodel if method == "percentile" and bits == 8 else percentile
        except VitqError as err:
            cells.append("refused")
            reasons.add(first_line(err))
        except Exception as err:  # a bug, not a refusal: recorded as such, the table goes on
            cells.append("error")
            reasons.add(f"{method}: {type(err).__name__}: {first_line(err)}")
    onnx, integer = "–", "–"
    if percentile is not None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                exported = export_onnx(percentile, Path(tmp) / "m.onnx")
                onnx = f"yes ({len(exported.float_points)} float paths)"
            except Exception as err:  # noqa: BLE001 (a refusal or a bug: both go in the table)
                onnx = f"no: {type(err).__name__}: {first_line(err)}"
        try:
            IntegerViT.compile(percentile, x)
            integer = "yes"
        except Exception as err:  # noqa: BLE001
            integer = f"no: {first_line(err)}"
    runs = sum(cell not in ("refused", "error") for cell in cells)
    summary = [label, f"`{name}`", f"{runs}/{len(methods)}", onnx, integer, "; ".join(sorted(reasons)) or "—"]
    return summary, [label, *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configs = smoke_configs()
    parser.add_argument("--families", type=comma_list(str), default=list(configs),
                        help="keys of vitq.models.smoke.smoke_configs() (default: all)")
    parser.add_argument("--images", type=int, default=2, help="random calibration/test images per family")
    parser.add_argument("--low-bits", type=int, default=4, help="bits of the low-bit table (every family)")
    parser.add_argument("--hybrid-bits", type=int, default=6, help="bits of the hybrid comparison table")
    parser.add_argument("--quick", action="store_true",
                        help="shrink the slowest searches (vitq.models.smoke.SMOKE_OPTIONS) in the main table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coverage.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in method_names() if m != "float"]
    summaries, grid, low, hybrids = [], [], [], []
    for key in args.families:
        config = configs[key]
        label, name, model = config.label, config.timm_name, build_smoke_model(config)
        summary, cells = family_row(label, name, model, methods, args.images,
                                    options=SMOKE_OPTIONS if args.quick else None)
        summaries.append(summary)
        grid.append(cells)
        print(" | ".join(summary), flush=True)
        _, cells = family_row(label, name, model, list(LOW_BIT_METHODS), args.images, bits=args.low_bits)
        low.append(cells)
        print(" | ".join(cells), flush=True)
        if key in HYBRIDS:
            _, cells = family_row(label, name, model, list(HYBRID_METHODS), args.images, bits=args.hybrid_bits)
            hybrids.append(cells)
            print(" | ".join(cells), flush=True)
    write_report(args.out, [
        *report_header(
            "Model coverage: family x method on small random-initialised timm models (W8A8, then W4A4)",
            f"- {args.images} random images per family (calibration and test); reconstruction methods with "
            f"{RECON.iterations} iterations"
            + (f"; searches shrunk ({SMOKE_OPTIONS})" if args.quick else "")
            + "; nothing downloaded; the small configs are "
            "`vitq.models.smoke.smoke_configs()` (few blocks, 56-128 px), every weight nudged by N(0, 0.05²)",
            "- SQNR: logits of the quantized model against the float model on those images, dB (random weights: a "
            "wiring check, not an accuracy claim); ONNX and integer runtime: the `percentile` W8A8 model"),
        markdown_table(["family", "timm model", "methods that run", "ONNX export", "integer-only runtime compiles",
                        "refusals"], summaries),
        "",
        "Logit SQNR (dB) per method:",
        "",
        markdown_table(["family", *methods], grid),
        "",
        f"Every family at W{args.low_bits}A{args.low_bits}, logit SQNR (dB) (`refused`: the method refused it):",
        "",
        markdown_table(["family", *LOW_BIT_METHODS], low),
        "",
        f"Hybrid CNN-ViTs at W{args.hybrid_bits}A{args.hybrid_bits}, logit SQNR (dB) (no real hybrid weights are "
        "available offline, so this compares the methods' mechanics on random weights only):",
        "",
        markdown_table(["family", *HYBRID_METHODS], hybrids),
        "",
    ])


if __name__ == "__main__":
    main()
