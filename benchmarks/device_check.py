"""Every registered method, and the paths around it, on one device: a smoke check for GPUs.

    PYTHONPATH=src python benchmarks/device_check.py --device cuda --out device_check.md
    PYTHONPATH=src python benchmarks/device_check.py --device cpu --out device_check_cpu.md

Each method quantizes timm's tiny random-init ``test_vit`` (6 blocks, dim 64, 160 px) at W4A4 on a few random
calibration images, with two reconstruction steps where the method reconstructs, on ``--device``. A row is ok
when the method returns, every parameter, buffer and tensor attribute of the quantized model is on that device,
and its logits are finite. Then the paths around a quantized model: reconstruction with QDrop and augmentation,
the per-point SQNR and size, save and load onto the device, the integer-only runtime, ONNX export of a device
model, and RepQ-ViT on a tiny random Swin. One failure never stops the others: its row holds the error's first
line and the last frame of its traceback. TF32 is off, so float32 products are float32 on every device.
Exit code: 0 when every row is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import vitq
from vitq.config import ReconConfig
from vitq.device import resolve_device
from vitq.methods import method_class, method_names

#: calibration images (random, 160 px) and the bit widths of every method's run
CALIB_IMAGES = 4
W_BITS, A_BITS = 4, 4
#: the reconstruction of the methods that reconstruct: two Adam steps per block on two images
QUICK_RECON = {"iterations": 2, "batch_size": 2}
#: per-method options that keep each run at a few seconds on a CPU (the defaults search far more candidates)
QUICK_OPTIONS: dict[str, dict] = {
    "adalog": {"fpcs_rounds": 1},
    "erq": {"refine_iters": 2},
    "ptq4vit": {"eq_n": 4},
    "noisyquant": {"amplitudes": [0.0, 0.5]},
}


@dataclass
class Row:
    name: str
    ok: bool
    seconds: float
    error: str = ""
    where: str = ""


def tiny_vit() -> nn.Module:
    """timm's ``test_vit`` with random weights (seed 0), on the CPU."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def tiny_swin() -> nn.Module:
    """A two-stage Swin of window 4 on 32 px images with random weights (seed 0), on the CPU."""
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=10).eval()


def random_images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def misplaced(model: nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters, buffers and plain tensor attributes of ``model`` that are not on ``device``."""
    wrong = [f"{name} ({t.device})" for name, t in [*model.named_parameters(), *model.named_buffers()]
             if t.device != device]
    for module_name, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and value.device != device:
                wrong.append(f"{module_name}.{attr} ({value.device}, attribute)")
    return wrong


def check_on_device(model: nn.Module, device: torch.device, images: torch.Tensor) -> None:
    """Raise unless every tensor of ``model`` is on ``device`` and its logits on ``images`` are finite."""
    wrong = misplaced(model, device)
    if wrong:
        raise AssertionError(f"{len(wrong)} tensor(s) off {device}, e.g. {', '.join(wrong[:3])}")
    with torch.no_grad():
        logits = model(images.to(device))
    if logits.device != device:
        raise AssertionError(f"logits on {logits.device}, not {device}")
    if not bool(torch.isfinite(logits).all()):
        raise AssertionError("logits are not finite")


def run_row(name: str, work: Callable[[], None], sync: Callable[[], None]) -> Row:
    """``work()`` timed, its exception (if any) reduced to one line and the last frame of its traceback."""
    start = time.perf_counter()
    try:
        work()
        sync()
        return Row(name, True, time.perf_counter() - start)
    except Exception as err:  # a smoke check: every failure is a row, none stops the others
        seconds = time.perf_counter() - start
        frames = traceback.extract_tb(err.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
        message = (str(err).strip().splitlines() or [""])[0]
        return Row(name, False, seconds, f"{type(err).__name__}: {message}"[:200], where)


def method_config(method: str, **extra) -> vitq.QuantConfig:
    """W4A4 on :data:`CALIB_IMAGES` images, quick options, and quick reconstruction where the method has one."""
    reconstructs = method_class(method).reconstructs
    return vitq.QuantConfig(method=method, w_bits=W_BITS, a_bits=A_BITS, calib_size=CALIB_IMAGES,
                            options=QUICK_OPTIONS.get(method, {}),
                            reconstruct=ReconConfig(**QUICK_RECON) if reconstructs else None, **extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--out", type=Path, help="write the markdown table to this file too")
    parser.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    args = parser.parse_args(argv)
    # float32 products stay float32 on the GPU too (no TF32), so a GPU run differs from a CPU run by order only
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = resolve_device(args.device)

    def sync() -> None:  # asynchronous kernels: a failure or the time belongs to the row that launched them
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    model = tiny_vit()
    images = random_images(CALIB_IMAGES, 160)
    rows: list[Row] = []
    quantized: dict[str, vitq.QuantizedModel] = {}

    def quantize(method: str, key: str, **extra) -> Callable[[], None]:
        def work() -> None:
            qmodel = vitq.quantize(model, method_config(method, **extra), images, progress=False, device=device)
            check_on_device(qmodel, device, images)
            quantized[key] = qmodel
        return work

    methods = args.methods.split(",") if args.methods else method_names()
    for method in methods:
        rows.append(run_row(method, quantize(method, method), sync))
        print(f"{method}: {'ok' if rows[-1].ok else rows[-1].error}", flush=True)

    def recon_qdrop() -> None:  # QDrop masks and augmentation: the random draws of the reconstruction
        config = vitq.QuantConfig(method="percentile", w_bits=W_BITS, a_bits=A_BITS, calib_size=CALIB_IMAGES,
                                  reconstruct=ReconConfig(**QUICK_RECON, drop_prob=0.5, augment=1))
        check_on_device(vitq.quantize(model, config, images, progress=False, device=device), device, images)

    def sqnr_and_size() -> None:
        from vitq.eval.errors import point_sqnr
        from vitq.eval.size import model_size

        qmodel = quantized["percentile"]
        if not point_sqnr(qmodel, images):
            raise AssertionError("no SQNR points")
        model_size(qmodel)

    def save_load() -> None:
        for method in ("percentile", "adalog", "ptq4vit", "noisyquant"):
            if method not in quantized:
                continue
            qmodel = quantized[method]
            with tempfile.TemporaryDirectory() as folder:
                path = vitq.save(qmodel, Path(folder) / "model.safetensors")
                loaded = vitq.load(path, device=device)
            check_on_device(loaded, device, images)
            with torch.no_grad():
                if not torch.equal(loaded(images.to(device)), qmodel(images.to(device))):
                    raise AssertionError(f"{method}: the loaded model's logits differ from the saved model's")

    def integer_runtime() -> None:
        from vitq.export.integer_vit import IntegerViT

        config = vitq.QuantConfig(method="minmax", w_bits=8, a_bits=8, calib_size=CALIB_IMAGES)
        qmodel = vitq.quantize(model, config, images, progress=False, device=device)
        runtime = IntegerViT.compile(qmodel, images)
        check_on_device(runtime, device, images)

    def onnx_export() -> None:
        from vitq.export.onnx import export_onnx

        qmodel = quantized["percentile"]
        with tempfile.TemporaryDirectory() as folder:
            export_onnx(qmodel, Path(folder) / "model.onnx")
        check_on_device(qmodel, device, images)  # exported from a CPU copy: the model itself stays put

    def swin() -> None:
        swin_model, swin_images = tiny_swin(), random_images(CALIB_IMAGES, 32)
        config = vitq.QuantConfig(method="repq-vit", w_bits=W_BITS, a_bits=A_BITS, calib_size=CALIB_IMAGES)
        qmodel = vitq.quantize(swin_model, config, swin_images, model_name="swin_tiny_patch4_window7_224",
                               progress=False, device=device)
        check_on_device(qmodel, device, swin_images)

    extras = {"reconstruction with QDrop + augment": recon_qdrop, "SQNR and size": sqnr_and_size,
              "save + load(device=)": save_load, "integer-only runtime": integer_runtime,
              "ONNX export of a device model": onnx_export, "repq-vit on a tiny Swin": swin}
    for name, work in extras.items():
        rows.append(run_row(name, work, sync))
        print(f"{name}: {'ok' if rows[-1].ok else rows[-1].error}", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# vitq device check on {device} ({name})", "",
             f"torch {torch.__version__}, test_vit at W{W_BITS}A{A_BITS} on {CALIB_IMAGES} random images, TF32 off; "
             f"{sum(r.ok for r in rows)}/{len(rows)} ok", "",
             "| check | result | seconds | where it failed |", "|---|---|---:|---|"]
    for row in rows:
        result = "ok" if row.ok else "error: " + row.error.replace("|", "\\|")
        lines.append(f"| {row.name} | {result} | {row.seconds:.2f} | {row.where} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
