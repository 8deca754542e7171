"""Per-layer attention-output error of post-Softmax quantizers on DeiT-tiny (issue 4 ablation).

Only the attention probabilities A are quantized (everything else float). For every block and every
quantizer kind, the parameters are fitted on the calibration images by the attention-output error
‖A·V − Q(A)·V‖² (the same criterion for every kind; log√2 is also shown with RepQ-ViT's own
‖A − Q(A)‖² fit), and the relative error ‖A·V − Q(A)·V‖² / ‖A·V‖² is reported on the calibration
images and on held-out images from the evaluation split (never used for fitting). Writes a markdown
table and a per-layer plot.

    python benchmarks/softmax_attention_mse.py --bits 4 --out-dir benchmarks/results/softmax_mse
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import deit_tiny_split, report_header, write_report  # noqa: E402

import vitq  # noqa: E402
from vitq.calib.search import attention_output_mse, search_by_output_error  # noqa: E402
from vitq.files import atomic_file  # noqa: E402
from vitq.quantizers import build_quantizer  # noqa: E402
from vitq.report.tables import markdown_table  # noqa: E402

#: label -> (spec without bits, fit criterion: "output" = attention-output error, "self" = ‖A − Q(A)‖²)
KINDS = {
    "log√2 (RepQ fit)": ({"kind": "log_sqrt2"}, "self"),
    "log√2": ({"kind": "log_sqrt2"}, "output"),
    "log2": ({"kind": "log2"}, "output"),
    "TanQ tan_log": ({"kind": "tanq", "variant": "tan_log"}, "output"),
    "TanQ tan": ({"kind": "tanq", "variant": "tan"}, "output"),
    "uniform": ({"kind": "uniform", "granularity": "tensor", "init": "mse"}, "self"),
}


@torch.no_grad()
def capture_attention(qmodel, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, v) of every attention module, float model, on ``images``."""
    captured: dict[int, dict[str, torch.Tensor]] = {}
    hooks = []
    for i, attn in enumerate(qmodel.attention_modules()):
        captured[i] = {}
        hooks.append(attn.softmax.register_forward_hook(lambda m, a, o, d=captured[i]: d.__setitem__("A", o)))
        hooks.append(attn.v.register_forward_hook(lambda m, a, o, d=captured[i]: d.__setitem__("v", o)))
    qmodel(images)
    for hook in hooks:
        hook.remove()
    return [(d["A"], d["v"]) for _, d in sorted(captured.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-size", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=32, help="evaluation-split images for the held-out error")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/softmax_mse"))
    args = parser.parse_args()

    model, calib, (heldout, _) = deit_tiny_split(args.calib_size, args.seed, args.heldout)
    qmodel = vitq.prepare(model, vitq.QuantConfig(method="float"))
    fit_data, test_data = capture_attention(qmodel, calib), capture_attention(qmodel, heldout)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    sections = report_header(
        "Post-Softmax quantizers: per-layer attention-output error, DeiT-tiny",
        f"- fit: {args.calib_size} calibration images (seed {args.seed}); held-out: the first {args.heldout} "
        "evaluation images of that split",
        "- error: relative attention-output MSE ‖A·V − Q(A)·V‖² / ‖A·V‖², only A quantized, float elsewhere")
    for bits in args.bits:
        errors: dict[str, list[float]] = {label: [] for label in KINDS}
        for (a_fit, v_fit), (a_test, v_test) in zip(fit_data, test_data, strict=True):
            for label, (spec, fit) in KINDS.items():
                quantizer = build_quantizer({**spec, "bits": bits})
                if fit == "output":
                    search_by_output_error(quantizer, a_fit, lambda a, s, v=v_fit: a @ v[s], chunk=8)
                else:
                    quantizer.calibrate(a_fit)
                errors[label].append(attention_output_mse(quantizer, a_test, v_test))
        n_layers = len(fit_data)
        tanq_wins = sum(t < s for t, s in zip(errors["TanQ tan_log"], errors["log√2"], strict=True))
        rows = [[str(i), *(f"{errors[label][i]:.2e}" for label in KINDS)] for i in range(n_layers)]
        rows.append(["mean", *(f"{sum(errors[label]) / n_layers:.2e}" for label in KINDS)])
        sections += [
            f"## {bits}-bit attention map (held-out error)",
            "",
            f"TanQ (tan_log) below log√2 (same fit criterion) on {tanq_wins} of {n_layers} layers.",
            "",
            markdown_table(["block", *KINDS], rows),
            "",
            f"![per-layer error]({bits}bit.png)",
            "",
        ]
        fig, ax = plt.subplots(figsize=(7, 4))
        for label in KINDS:
            ax.plot(range(n_layers), errors[label], marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("relative attention-output MSE")
        ax.set_title(f"DeiT-tiny, {bits}-bit post-Softmax, held-out images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_file(args.out_dir / f"{bits}bit.png") as partial:
            fig.savefig(partial, format="png", dpi=120)
        plt.close(fig)
    write_report(args.out_dir / "softmax_mse.md", sections)


if __name__ == "__main__":
    main()
