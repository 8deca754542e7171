"""Which model families vitq quantizes: family x method on small random-initialised timm models.

For each family (a small config of one timm model: few blocks, random weights, nothing downloaded) and each
registered method at W8A8 (reconstruction methods with a 4-iteration budget): whether it runs, refuses (the
first line of the error) or fails with another exception (``error``: a bug to fix); the logit SQNR of the
quantized model against the float one on random images; whether the ``percentile`` W8A8 model exports to ONNX
(and how many points keep a float path) and whether the integer-only runtime compiles it. Random weights make
the SQNR a smoke check of the wiring (a broken adapter gives ~0 dB), not an accuracy claim.

    python benchmarks/coverage.py --out benchmarks/results/coverage.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
from common import comma_list, report_header, write_report

import vitq
from vitq.checks import expected_image_size
from vitq.config import ReconConfig
from vitq.errors import VitqError
from vitq.export.integer_vit import IntegerViT
from vitq.export.onnx import export_onnx
from vitq.methods import method_class, method_names
from vitq.report.tables import markdown_table

#: family -> (timm name, kwargs that make it small)
FAMILIES: dict[str, tuple[str, dict]] = {
    "ViT": ("vit_tiny_patch16_224", {"depth": 2}),
    "DeiT (distilled)": ("deit_tiny_distilled_patch16_224", {"depth": 2}),
    "DeiT III (LayerScale)": ("deit3_small_patch16_224", {"depth": 2}),
    "DINOv2 (registers)": ("vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 98}),
    "CLIP image tower": ("vit_base_patch16_clip_224", {"depth": 2, "embed_dim": 192, "num_heads": 3}),
    "SigLIP image tower": ("vit_base_patch16_siglip_224", {"depth": 2, "embed_dim": 192, "num_heads": 3}),
    "Swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6)}),
    "Swin v2": ("swinv2_tiny_window8_256", {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6)}),
    "EVA02": ("eva02_tiny_patch14_224", {"depth": 2}),
    "BEiT": ("beit_base_patch16_224", {"depth": 2, "embed_dim": 192, "num_heads": 3}),
    "CaiT": ("cait_xxs24_224", {"depth": 2}),
    "XCiT": ("xcit_nano_12_p16_224", {"depth": 2}),
    "PiT": ("pit_ti_224", {}),
    "ConViT": ("convit_tiny", {"depth": 2}),
    "LeViT": ("levit_128s", {}),
    "MobileViT": ("mobilevit_xxs", {}),
    "MobileViT v2": ("mobilevitv2_050", {}),
    "EfficientViT (MIT)": ("efficientvit_b0", {}),
    "EfficientViT (MSRA)": ("efficientvit_m0", {}),
    "TinyViT": ("tiny_vit_5m_224", {}),
}
RECON = ReconConfig(iterations=4, batch_size=2)


def first_line(err: Exception) -> str:
    return str(err).splitlines()[0][:140]


def sqnr_db(reference: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.square().mean() / (out - reference).square().mean().clamp_min(1e-30)))


def family_row(label: str, name: str, kwargs: dict, methods: list[str], images: int) -> tuple[list, list]:
    """The summary row of one family and its per-method cells."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    size = expected_image_size(model) or tuple(model.pretrained_cfg["input_size"][1:])
    x = torch.randn(images, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)
    cells, reasons, percentile = [], set(), None
    for method in methods:
        config = vitq.QuantConfig(method=method, w_bits=8, a_bits=8, calib_size=images,
                                  reconstruct=RECON if method_class(method).reconstructs else None)
        try:
            qmodel = vitq.quantize(model, config, x, model_name=name, progress=False)
            with torch.no_grad():
                cells.append(f"{sqnr_db(reference, qmodel(x)):.0f}")
            percentile = qmodel if method == "percentile" else percentile
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
    parser.add_argument("--families", type=comma_list(str), default=list(FAMILIES),
                        help="labels of FAMILIES to run (default: all)")
    parser.add_argument("--images", type=int, default=2, help="random calibration/test images per family")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coverage.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in method_names() if m != "float"]
    summaries, grid = [], []
    for label in args.families:
        summary, cells = family_row(label, *FAMILIES[label], methods, args.images)
        summaries.append(summary)
        grid.append(cells)
        print(" | ".join(summary), flush=True)
    write_report(args.out, [
        *report_header(
            "Model coverage: family x method on small random-initialised timm models (W8A8)",
            f"- {args.images} random images per family (calibration and test); reconstruction methods with "
            f"{RECON.iterations} iterations; nothing downloaded",
            "- SQNR: logits of the quantized model against the float model on those images, dB (random weights: a "
            "wiring check, not an accuracy claim); ONNX and integer runtime: the `percentile` W8A8 model"),
        markdown_table(["family", "timm model", "methods that run", "ONNX export", "integer-only runtime compiles",
                        "refusals"], summaries),
        "",
        "Logit SQNR (dB) per method:",
        "",
        markdown_table(["family", *methods], grid),
        "",
    ])


if __name__ == "__main__":
    main()
