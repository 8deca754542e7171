"""The ``vitq`` command line: ``inspect``, ``quantize``, ``eval``, ``compare`` and ``export``.

    vitq inspect --method percentile --w-bits 4 --a-bits 4 --override head=8
    vitq quantize --method minmax --w-bits 8 --a-bits 8 --output runs/minmax_w8a8
    vitq eval --quantized runs/minmax_w8a8 --json runs/minmax_w8a8/eval.json
    vitq eval --method float --limit 100
    vitq export runs/minmax_w8a8 --format onnx --output runs/minmax_w8a8.onnx
    vitq eval --backend onnxruntime --model runs/minmax_w8a8.onnx --threads 2
    vitq eval --quantized runs/minmax_w8a8 --backend integer
    vitq compare --methods minmax,percentile --bits W8A8,W6A6,W4A4 --seeds 0,1,2 --out-dir runs/compare
    vitq compare --methods "dopq-vit[softmax=log2],dopq-vit[softmax=tanq]" --reference "dopq-vit[softmax=log2]" \
        --out-dir runs/softmax

Calibration and evaluation images come from one folder, split by ``--calib-size`` and ``--seed``
(:func:`vitq.calib.data.split_calib_eval`), so a run is reproducible from its seed. Every problem a
user can cause is printed as one line ``vitq: error: <message>`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import vitq
from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE, assets_dir
from vitq.calib.data import ImageNetImages, load_tensors, split_calib_eval, transform_for_model
from vitq.config import PointOverride, QuantConfig, ReconConfig, make
from vitq.errors import VitqError
from vitq.eval.accuracy import EvalResult
from vitq.eval.errors import PointError, point_sqnr
from vitq.eval.size import SizeReport, model_size
from vitq.export.onnx import DEFAULT_OPSET, export_onnx
from vitq.methods import method_class, method_names
from vitq.models.registry import create_model
from vitq.quantized_model import QuantizedModel
from vitq.report import CompareRun, machine_summary, peak_rss_mb, sha256_prefix, text_table, write_compare_report
from vitq.report.compare import FLOAT, summary_columns, summary_rows
from vitq.report.leaderboard import write_leaderboard

DEFAULT_MODEL = "deit_tiny_patch16_224"
EXIT_USER_ERROR = 2
#: calibration images used for the per-point SQNR (a forward pass of the float and quantized model each)
SQNR_IMAGES = 8
WORST_POINTS = 5
MODEL_FILE = "model.safetensors"
QUANTIZE_FILE = "quantize.json"
JOURNAL_FILE = "runs.jsonl"
MB = 1e6
BACKENDS = ("torch", "onnxruntime", "integer")
DEFAULT_COMPARE_METHODS, DEFAULT_COMPARE_BITS = "minmax,percentile", "W8A8,W6A6,W4A4"
PRESETS = ("leaderboard",)
#: a compare variant's bracket key for its own reconstruction settings (``recon``, ``recon.iterations``, ...)
RECON_KEY = "recon"
LEADERBOARD_BITS = "W8A8,W6A6,W4A4,W3A3"
LEADERBOARD_DIR = Path("benchmarks/results/leaderboard")
EXPORT_FORMATS = ("onnx",)


# ====================================================================== option parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ``vitq: error: ...`` like every other error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"vitq: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(minimum: int, what: str):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", type=Path,
                   help=f"local .safetensors state dict (default: $VITQ_ASSETS/{DEIT_TINY_CHECKPOINT} for "
                        f"{DEFAULT_MODEL} if present, else timm's pretrained download)")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _method_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method", choices=method_names(), help="quantization method (default percentile)")
    p.add_argument("--w-bits", type=int, help="weight bits, 2..8 (default 8)")
    p.add_argument("--a-bits", type=int, help="activation bits, 2..8 (default 8)")
    return p


def _tuning_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=VALUE",
                   help="per-point override: PATTERN=float, PATTERN=BITS or PATTERN=KIND[:BITS] (repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option; VALUE is parsed as JSON when possible, else kept as text (repeatable)")
    return p


def _recon_options(*, checkpoint: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--reconstruct", action="store_true",
                   help="block reconstruction after calibration (AdaRound weights + LSQ activation steps, on the "
                        "calibration images; pair it with a larger --calib-size, e.g. 256)")
    p.add_argument("--recon", action="append", default=[], metavar="KEY=VALUE",
                   help="reconstruction setting (implies --reconstruct), e.g. iterations=100, batch_size=16, "
                        "drop_prob=0.5 (QDrop); VALUE is parsed as JSON (repeatable)")
    if checkpoint:
        p.add_argument("--recon-checkpoint", type=Path, metavar="DIR",
                       help="save the reconstruction after every block here, and resume from it if it is there")
    return p


def _data_options(*, seed: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", type=Path, help=f"ImageNet image folder (default $VITQ_ASSETS/{IMAGENET_SAMPLE})")
    p.add_argument("--calib-size", type=_positive_int, help="number of calibration images (default 32)")
    if seed:
        p.add_argument("--seed", type=_non_negative_int,
                       help="selects the calibration images and seeds the method (default 0)")
    return p


def _eval_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N evaluation images")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``vitq`` argument parser with its five subcommands."""
    parser = _Parser(prog="vitq", description="Post-training quantization of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitq {vitq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, method, tuning = _common_options(), _method_options(), _tuning_options()

    p = sub.add_parser("inspect", parents=[common, method, tuning],
                       help="list every quantizer slot of a model (no data, no calibration)")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("quantize", parents=[common, method, tuning, _recon_options(checkpoint=True),
                                            _data_options(seed=True)],
                       help="quantize on the calibration split and save the model")
    p.add_argument("--output", type=Path, required=True, metavar="DIR",
                   help=f"folder for {MODEL_FILE} and {QUANTIZE_FILE}")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--no-pack", action="store_true",
                   help="keep the float weights in the file (default: quantized weights as bit-packed codes)")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("eval", parents=[common, method, tuning, _recon_options(checkpoint=True),
                                        _data_options(seed=True), _eval_options()],
                       help="top-1/top-5 on the evaluation split (quantizing first, or --quantized DIR)")
    p.add_argument("--quantized", type=Path, metavar="DIR", help="evaluate the model saved by 'vitq quantize'")
    p.add_argument("--sqnr", action="store_true", help="print the per-point SQNR table (and put it in the JSON)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: the fake-quant model (default); onnxruntime: the ONNX file given as --model "
                        "FILE.onnx (written by 'vitq export'), with --threads intra-op threads; integer: the "
                        "integer-only runtime (I-ViT kernels) compiled from the quantized ViT/DeiT")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("export", help="write a model saved by 'vitq quantize' in a deployment format")
    p.add_argument("quantized", type=Path, metavar="QUANTIZED_DIR", help="folder written by 'vitq quantize --output'")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                   help="onnx: QuantizeLinear/DequantizeLinear graph with int8 weights (default)")
    p.add_argument("--output", type=Path, required=True, metavar="FILE", help="the file to write (FILE.onnx)")
    p.add_argument("--opset", type=_int_at_least(13, "--opset"), default=DEFAULT_OPSET,
                   help="ONNX opset, >= 13 for per-channel QDQ (default %(default)s)")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("compare", parents=[common, tuning, _recon_options(checkpoint=False),
                                           _data_options(seed=False), _eval_options()],
                       help="methods x bit settings x seeds against float: markdown, CSV and a plot")
    p.add_argument("--methods",
                   help="comma-separated methods, each optionally with its own options in brackets, e.g. "
                        "'dopq-vit[softmax=log2;target=mean]' (merged over --option; the text is the report "
                        "label); 'recon=true' or 'recon.KEY=VALUE' in the brackets reconstruct that variant only, "
                        f"e.g. 'dopq-vit[recon.iterations=100]' (default {DEFAULT_COMPARE_METHODS})")
    p.add_argument("--preset", choices=PRESETS,
                   help="leaderboard: every calibration-only method at W8A8, W6A6, W4A4, W3A3 (and the settings a "
                        "method adds, e.g. W3A4 for gptq/erq), writing leaderboard.md next to compare.md (default "
                        f"--out-dir {LEADERBOARD_DIR})")
    p.add_argument("--reference", metavar="LABEL",
                   help="one of the --methods labels: add the paired top-1 difference to it (per seed, same images)")
    p.add_argument("--bits", help=f"comma-separated WxAy settings (default {DEFAULT_COMPARE_BITS})")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help=f"folder for compare.md, compare.csv, compare.png and the run journal {JOURNAL_FILE}")
    p.add_argument("--resume", action="store_true",
                   help=f"reuse the runs already in DIR/{JOURNAL_FILE} that match exactly (same model, data, "
                        "configuration, seed and evaluation images) instead of running them again")
    p.set_defaults(run=cmd_compare)
    return parser


# ====================================================================== shared helpers


def _model_name(args: argparse.Namespace) -> str:
    return args.model or DEFAULT_MODEL


def _checkpoint(args: argparse.Namespace) -> Path | None:
    """``--checkpoint``, else the DeiT-tiny asset for the default model when present, else None (download)."""
    if args.checkpoint is not None:
        return args.checkpoint
    default = assets_dir() / DEIT_TINY_CHECKPOINT
    return default if _model_name(args) == DEFAULT_MODEL and default.is_file() else None


def _data_dir(args: argparse.Namespace) -> Path:
    return args.data or assets_dir() / IMAGENET_SAMPLE


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (``3``, ``0.5``, ``true``, ``[1, 2]``), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise VitqError(f"option {text!r} must look like KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _config(args: argparse.Namespace, options: dict[str, Any] | None = None, **given: Any) -> QuantConfig:
    """The validated config from the command line; ``given`` (e.g. ``method=``) takes precedence and
    ``options`` are merged over the ``--option`` values."""
    values = {"method": getattr(args, "method", None), "w_bits": getattr(args, "w_bits", None),
              "a_bits": getattr(args, "a_bits", None), "calib_size": getattr(args, "calib_size", None),
              "seed": getattr(args, "seed", None), **given}
    options = {**dict(_parse_option(text) for text in args.option), **(options or {})}
    # reconstruction: --reconstruct / --recon for every run, or a compare variant's own "recon" (true: the defaults)
    # and "recon.KEY" settings, e.g. 'dopq-vit[recon.iterations=100]'
    recon = dict(_parse_option(text) for text in getattr(args, "recon", []))
    reconstruct = bool(recon) or getattr(args, "reconstruct", False)
    for key in [k for k in options if k == RECON_KEY or k.startswith(RECON_KEY + ".")]:
        value = options.pop(key)
        if key == RECON_KEY:
            if not isinstance(value, bool):
                raise VitqError(f"{RECON_KEY} must be true or false, got {value!r}")
            reconstruct = reconstruct or value
        else:
            recon[key.removeprefix(RECON_KEY + ".")] = value
            reconstruct = True
    if reconstruct:
        values["reconstruct"] = make(ReconConfig, **recon)
    return make(QuantConfig, **{k: v for k, v in values.items() if v is not None},
                overrides=[PointOverride.parse(text) for text in args.override], options=options)


def _load_float_model(args: argparse.Namespace) -> nn.Module:
    return create_model(_model_name(args), checkpoint=_checkpoint(args))


def _architecture(name: str) -> nn.Module:
    """A randomly initialised timm model: the structure only, nothing is downloaded."""
    import timm

    if not timm.is_model(name):
        create_model(name)  # raises the registry's "unknown model ..., did you mean ...?" error first
    return timm.create_model(name, pretrained=False).eval()


@dataclass(frozen=True)
class Split:
    """Dataset indices of the calibration and (possibly ``--limit``-ed) evaluation images of one seed."""

    seed: int
    calib: list[int]
    eval: list[int]


class ImageCache:
    """The images of one folder, preprocessed for one model and kept by index.

    Each image is decoded once per process however often it is used, so a ``compare`` grid
    preprocesses its images once for every method, bit setting and seed.
    """

    def __init__(self, root: Path, model: nn.Module, *, progress: bool) -> None:
        self.dataset = ImageNetImages(root, transform=transform_for_model(model))
        self.progress = progress
        self._images: dict[int, torch.Tensor] = {}
        self._labels: dict[int, int] = {}

    def split(self, calib_size: int, seed: int, limit: int | None = None) -> Split:
        calib, evaluation = split_calib_eval(len(self.dataset), calib_size, seed, source=str(self.dataset.root))
        return Split(seed, calib, evaluation[:limit])

    def file_names(self, indices: Sequence[int]) -> list[str]:
        return [self.dataset.samples[i][0].name for i in indices]

    def tensors(self, indices: Sequence[int], desc: str = "loading images") -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[N, 3, H, W]`` and labels ``[N]`` of ``indices``, decoding those not seen yet."""
        if not indices:
            raise VitqError("no images selected to load")
        missing = sorted(set(indices).difference(self._images))
        if missing:
            images, labels = load_tensors(self.dataset, missing, progress=self.progress, desc=desc)
            self._images.update(zip(missing, images, strict=True))
            self._labels.update(zip(missing, labels.tolist(), strict=True))
        return (torch.stack([self._images[i] for i in indices]),
                torch.tensor([self._labels[i] for i in indices], dtype=torch.int64))


def _quantize(model: nn.Module, name: str, config: QuantConfig, cache: ImageCache, split: Split, *,
              progress: bool, inplace: bool, recon_checkpoint: Path | None = None) -> tuple[QuantizedModel, float]:
    """``model`` quantized with ``config`` on the split's calibration images, and the calibration seconds
    (reconstruction included)."""
    if config.method == "float":  # nothing to calibrate: skip loading the calibration images
        return vitq.prepare(model, config, model_name=name, inplace=inplace), 0.0
    images, _ = cache.tensors(split.calib, "loading calibration images")
    start = time.perf_counter()
    qmodel = vitq.quantize(model, config, images, model_name=name, inplace=inplace, progress=progress,
                           recon_checkpoint=recon_checkpoint)
    return qmodel, time.perf_counter() - start


def _evaluate(model: nn.Module, cache: ImageCache, split: Split, args: argparse.Namespace) -> EvalResult:
    data = cache.tensors(split.eval, "loading evaluation images")
    return vitq.evaluate(model, data, batch_size=args.batch_size, progress=_progress(args))


def _accuracy_fields(result: EvalResult) -> dict[str, Any]:
    """The ``--json`` keys every ``vitq eval`` backend reports for its evaluation."""
    return {"top1": result.top1, "top5": result.top5, "top1_ci95": list(result.top1_ci95),
            "n_images": result.n_images, "seconds": result.seconds, "peak_mem_mb": peak_rss_mb(),
            "images_per_s": result.images_per_s}


def _sqnr(qmodel: QuantizedModel, cache: ImageCache, split: Split) -> list[PointError]:
    """Accumulated SQNR of every point on up to :data:`SQNR_IMAGES` calibration images."""
    images, _ = cache.tensors(split.calib[:SQNR_IMAGES], "loading calibration images")
    return point_sqnr(qmodel, images)


def _sqnr_table(errors: Sequence[PointError]) -> str:
    return text_table(["point", "SQNR dB"], [[e.point, e.sqnr_db] for e in errors])


def _sqnr_json(errors: Sequence[PointError]) -> list[dict[str, Any]]:
    """Per-point SQNR for JSON (an infinite SQNR, i.e. no error at all, becomes ``null``)."""
    return [{"point": e.point, "sqnr_db": e.sqnr_db if math.isfinite(e.sqnr_db) else None} for e in errors]


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _describe(qmodel: QuantizedModel, split: Split, calib_seconds: float | None) -> str:
    """One line: model, method/bits, calibration images and time."""
    config = qmodel.config
    if config.method == "float":
        how = "not quantized"
    else:
        took = "unknown time" if calib_seconds is None else f"{calib_seconds:.1f} s"
        how = f"calibrated on {len(split.calib)} images (seed {split.seed}) in {took}"
    return f"{qmodel.model_name}, {config.label}: {how}"


def _size_fields(size: SizeReport) -> dict[str, float]:
    return {"size_mb": size.quantized_bytes / MB, "float_size_mb": size.float_bytes / MB}


def _spec_summary(spec: dict[str, Any] | None) -> str:
    """``uniform 8-bit channel init=mse`` for a quantizer spec, ``float`` for none."""
    if spec is None:
        return "float"
    parts = [spec.get("kind"), f"{spec.get('bits')}-bit", spec.get("granularity")]
    if "group_size" in spec:
        parts.append(f"group_size={spec['group_size']}")
    if "init" in spec:
        parts.append(f"init={spec['init']}")
    return " ".join(str(p) for p in parts if p)


# ====================================================================== subcommands


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print every quantizer slot: name, role and quantizer (or float). No data, no calibration."""
    name = _model_name(args)
    model = create_model(name, checkpoint=args.checkpoint) if args.checkpoint else _architecture(name)
    qmodel = vitq.prepare(model, _config(args), model_name=name, inplace=True)
    specs = qmodel.quant_specs()
    rows = [[slot.name, slot.role, _spec_summary(specs[slot.name])] for slot in qmodel.slots()]
    n_quantized = sum(spec is not None for spec in specs.values())
    print(f"{name} ({qmodel.family} family), {qmodel.config.label}: "
          f"{len(rows)} quantizer slots, {n_quantized} quantized")
    print(text_table(["slot", "role", "quantizer"], rows), end="")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize on the calibration split; save the model and ``quantize.json`` in ``--output``."""
    config = _config(args)
    name, checkpoint = _model_name(args), _checkpoint(args)
    model = _load_float_model(args)
    cache = ImageCache(_data_dir(args), model, progress=_progress(args))
    split = cache.split(config.calib_size, config.seed)
    qmodel, calib_seconds = _quantize(model, name, config, cache, split, progress=_progress(args), inplace=True,
                                      recon_checkpoint=args.recon_checkpoint)
    model_path = vitq.save(qmodel, args.output / MODEL_FILE, packed=not args.no_pack)
    size = model_size(qmodel)
    worst = sorted(_sqnr(qmodel, cache, split), key=lambda e: e.sqnr_db)[:WORST_POINTS]
    record = {
        "model": name,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "data": str(cache.dataset.root),
        "config": config.model_dump(mode="json"),
        "calibration_images": [{"index": i, "file": f} for i, f in zip(split.calib, cache.file_names(split.calib),
                                                                        strict=True)],
        "calib_seconds": calib_seconds,
        "peak_mem_mb": peak_rss_mb(),
        **_size_fields(size),
        "file_bytes": model_path.stat().st_size,
        "worst_points": _sqnr_json(worst),
    }
    _write_json(args.output / QUANTIZE_FILE, record)
    if args.json:
        _write_json(args.json, record)
    print(_describe(qmodel, split, calib_seconds))
    print(f"size: {size.summary()}")
    print(f"worst {len(worst)} points by SQNR (on {min(len(split.calib), SQNR_IMAGES)} calibration images):")
    print(_sqnr_table(worst), end="")
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.2f} MB) and {args.output / QUANTIZE_FILE}")
    return 0


def _read_saved(folder: Path) -> tuple[QuantizedModel, float | None]:
    """The model saved in ``folder`` by ``vitq quantize`` and its calibration seconds (from ``quantize.json``)."""
    if not folder.is_dir():
        raise VitqError(f"quantized model folder {folder} does not exist")
    qmodel = vitq.load(folder / MODEL_FILE)
    info = folder / QUANTIZE_FILE
    if not info.is_file():
        return qmodel, None
    try:
        return qmodel, json.loads(info.read_text(encoding="utf-8")).get("calib_seconds")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise VitqError(f"cannot read {info}: {err}") from None


def _load_saved(args: argparse.Namespace) -> tuple[QuantizedModel, float | None]:
    """``--quantized DIR``'s model and calibration seconds; refuses options that contradict the saved model."""
    folder: Path = args.quantized
    qmodel, calib_seconds = _read_saved(folder)
    saved = qmodel.config
    given = {"--model": (args.model, qmodel.model_name), "--method": (args.method, saved.method),
             "--w-bits": (args.w_bits, saved.w_bits), "--a-bits": (args.a_bits, saved.a_bits)}
    conflicts = [f"{flag} {mine} (saved: {theirs})" for flag, (mine, theirs) in given.items()
                 if mine is not None and mine != theirs]
    if args.override or args.option:
        conflicts.append("--override/--option (the saved model is already quantized)")
    if conflicts:
        raise VitqError(f"--quantized {folder} conflicts with {'; '.join(conflicts)}")
    return qmodel, calib_seconds


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5 on the evaluation split of a freshly quantized (or float, or saved) model."""
    if args.backend == "onnxruntime":
        return _eval_onnxruntime(args)
    progress = _progress(args)
    if args.quantized:
        qmodel, calib_seconds = _load_saved(args)
        cache = ImageCache(_data_dir(args), qmodel.model, progress=progress)
        seed = qmodel.config.seed if args.seed is None else args.seed
        calib_size = qmodel.config.calib_size if args.calib_size is None else args.calib_size
        split = cache.split(calib_size, seed, args.limit)
    else:
        config = _config(args)
        model = _load_float_model(args)
        cache = ImageCache(_data_dir(args), model, progress=progress)
        split = cache.split(config.calib_size, config.seed, args.limit)
        qmodel, calib_seconds = _quantize(model, _model_name(args), config, cache, split,
                                          progress=progress, inplace=True, recon_checkpoint=args.recon_checkpoint)
    evaluated: nn.Module = qmodel
    if args.backend == "integer":
        from vitq.export.integer_vit import IntegerViT

        evaluated = IntegerViT.compile(qmodel, cache.tensors(split.calib, "loading calibration images")[0])
    result = _evaluate(evaluated, cache, split, args)
    size = model_size(qmodel)
    config = qmodel.config
    quantized = config.method != "float"
    record = {
        **_accuracy_fields(result), "calib_seconds": calib_seconds,
        "model": qmodel.model_name, "method": config.method,
        "w_bits": config.w_bits if quantized else None, "a_bits": config.a_bits if quantized else None,
        "calib_size": len(split.calib), "seed": split.seed, **_size_fields(size), "backend": args.backend,
    }
    print(_describe(qmodel, split, calib_seconds) + (" — integer-only runtime" if args.backend == "integer" else ""))
    print(result.summary())
    print(f"size: {size.summary()}")
    if args.sqnr:
        errors = _sqnr(qmodel, cache, split)
        print(f"per-point SQNR (on {min(len(split.calib), SQNR_IMAGES)} calibration images):")
        print(_sqnr_table(errors), end="")
        record["sqnr"] = _sqnr_json(errors)
    if args.json:
        _write_json(args.json, record)
    return 0


def _eval_onnxruntime(args: argparse.Namespace) -> int:
    """``vitq eval --backend onnxruntime --model FILE.onnx``: same split, same JSON keys as the torch backend."""
    from vitq.eval.ort import OrtModel

    if args.model is None:
        raise VitqError("--backend onnxruntime needs --model FILE.onnx (a file written by 'vitq export')")
    torch_only = {"--quantized": args.quantized, "--method": args.method, "--w-bits": args.w_bits,
                  "--a-bits": args.a_bits, "--checkpoint": args.checkpoint, "--sqnr": args.sqnr or None,
                  "--override/--option": args.override or args.option or None}
    given = [flag for flag, value in torch_only.items() if value is not None]
    if given:
        raise VitqError(f"--backend onnxruntime evaluates the ONNX file as exported; drop {', '.join(given)}")
    model = OrtModel(Path(args.model), threads=args.threads)
    header = model.header
    saved = QuantConfig.model_validate(header["config"])
    cache = ImageCache(_data_dir(args), _architecture(header["model_name"]), progress=_progress(args))
    split = cache.split(saved.calib_size if args.calib_size is None else args.calib_size,
                        saved.seed if args.seed is None else args.seed, args.limit)
    result = _evaluate(model, cache, split, args)
    float_points = [p["slot"] for p in header["points"] if p["form"] == "float path"]
    record = {
        **_accuracy_fields(result), "model": header["model_name"], "method": saved.method,
        "w_bits": saved.w_bits, "a_bits": saved.a_bits, "calib_size": len(split.calib), "seed": split.seed,
        "backend": "onnxruntime", "onnx_file": str(model.path), "file_mb": model.path.stat().st_size / MB,
        "float_path_points": float_points,
    }
    print(f"{model.path} ({header['model_name']}, {saved.label}) on onnxruntime, "
          f"{len(float_points)} points on a float path")
    print(result.summary())
    if args.json:
        _write_json(args.json, record)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model saved by ``vitq quantize`` (``--format onnx``), naming every point left on a float path."""
    qmodel, _ = _read_saved(args.quantized)
    exported = export_onnx(qmodel, args.output, opset=args.opset)
    forms = Counter(point.form for point in exported.points)
    print(f"wrote {exported.path} ({exported.path.stat().st_size / MB:.2f} MB): "
          + ", ".join(f"{n} {form}" for form, n in sorted(forms.items())))
    for point in exported.float_points:
        print(f"vitq: warning: {point.slot} ({point.quantizer}) stays on a float path: {point.reason}",
              file=sys.stderr)
    return 0


_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)


def _split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside square brackets: ``a[x=1,y=2],b`` -> ``["a[x=1,y=2]", "b"]``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def _parse_list(text: str, what: str) -> list[str]:
    """The non-empty comma-separated items of ``--what`` (commas inside brackets do not split), deduplicated."""
    items = [item.strip() for item in _split_top_level(text, ",") if item.strip()]
    if not items:
        raise VitqError(f"--{what} is empty")
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Variant:
    """One ``--methods`` item: a method with its own options, shown in the report as ``label``."""

    label: str
    method: str
    options: dict[str, Any]


_VARIANT = re.compile(r"^([^\[\]]+)(?:\[(.*)\])?$", re.DOTALL)


def _balanced(text: str) -> bool:
    """Whether every ``[`` in ``text`` is closed by a later ``]`` and no ``]`` comes unopened."""
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _parse_variant(item: str) -> Variant:
    """``dopq-vit[softmax=log2;target=mean]`` -> ``dopq-vit`` with those options (parsed like ``--option``).

    The label is the item without whitespace (``percentile[]`` is just ``percentile``).
    """
    text = "".join(item.split())
    match = _VARIANT.match(text)
    if match is None or not _balanced(match.group(2) or ""):
        raise VitqError(f"--methods item {item!r} must look like METHOD or METHOD[KEY=VALUE;KEY=VALUE...]")
    method, body = match.groups()
    if not body:
        return Variant(method, method, {})
    try:
        pairs = [_parse_option(part) for part in _split_top_level(body, ";")]
    except VitqError as err:
        raise VitqError(f"--methods item {item!r}: {err}") from None
    if len({key for key, _ in pairs}) != len(pairs):
        raise VitqError(f"--methods item {item!r} gives an option twice")
    return Variant(text, method, dict(pairs))


def parse_variants(text: str) -> list[Variant]:
    """The ``--methods`` variants, one per distinct label, in order; ``float`` is not allowed."""
    variants: dict[str, Variant] = {}
    for item in _parse_list(text, "methods"):
        variant = _parse_variant(item)
        variants.setdefault(variant.label, variant)
    if any(v.method == FLOAT for v in variants.values()):
        raise VitqError("--methods must not list float: the float model is always evaluated as the baseline")
    return list(variants.values())


def _reference(text: str | None, variants: Sequence[Variant]) -> str | None:
    """The ``--reference`` label (whitespace removed), which must be one of the variants' labels."""
    if text is None:
        return None
    label, labels = "".join(text.split()), [v.label for v in variants]
    if label not in labels:
        raise VitqError(f"--reference {text!r} is not one of the --methods labels: {', '.join(labels)}")
    return label


def _parse_bits(text: str) -> tuple[int, int]:
    """``W4A8`` -> ``(4, 8)``."""
    match = _BITS.match(text)
    if match is None:
        raise VitqError(f"bit setting {text!r} must look like W8A8 (weight bits, activation bits)")
    return int(match.group(1)), int(match.group(2))


def _parse_seed(text: str) -> int:
    if not text.isdigit():
        raise VitqError(f"seed {text!r} must be a non-negative integer")
    return int(text)


Grid = dict[int, list[tuple[str, QuantConfig]]]


def _compare_grid(args: argparse.Namespace, plan: Sequence[tuple[Variant, Sequence[tuple[int, int]]]],
                  seeds: Sequence[int]) -> Grid:
    """Per seed, the (label, config) of every variant at each of its bit settings, all validated (methods and
    their options included) before any model or image is loaded."""
    grid = {seed: [(v.label, _config(args, v.options, method=v.method, w_bits=w, a_bits=a, seed=seed))
                   for v, bits in plan for w, a in bits] for seed in seeds}
    for label, config in grid[seeds[0]]:
        try:
            method_class(config.method)(config)
        except VitqError as err:
            raise VitqError(f"--methods item {label!r}: {err}") from None
    return grid


def _compare_plan(args: argparse.Namespace) -> tuple[list[tuple[Variant, list[tuple[int, int]]]], list[str]]:
    """The variants with their bit settings, and every setting in order (the report's columns).

    ``--preset leaderboard``: every calibration-only method (float and reconstruction-based methods aside) at
    :data:`LEADERBOARD_BITS` plus its own ``extra_settings``; otherwise ``--methods`` x ``--bits``."""
    if args.preset == "leaderboard":
        if args.methods is not None or args.bits is not None or args.reference is not None:
            raise VitqError("--preset leaderboard chooses the methods and bits itself: drop --methods, --bits "
                            "and --reference")
        common = [_parse_bits(text) for text in LEADERBOARD_BITS.split(",")]
        plan = [(Variant(name, name, {}), common + [b for b in method_class(name).extra_settings if b not in common])
                for name in method_names() if name != FLOAT and not method_class(name).reconstructs]
    else:
        bits = [_parse_bits(text) for text in _parse_list(args.bits or DEFAULT_COMPARE_BITS, "bits")]
        plan = [(variant, bits) for variant in parse_variants(args.methods or DEFAULT_COMPARE_METHODS)]
    settings = list(dict.fromkeys(f"W{w}A{a}" for _, bits in plan for w, a in bits))
    return plan, settings


class Journal:
    """``runs.jsonl`` in the compare folder: one line per finished run, written as soon as it finishes, so
    an interrupted grid can go on with ``--resume``. A line is reused only for the very same run key."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.done: dict[str, CompareRun] = {}
        if resume and path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                try:
                    entry = json.loads(line)
                    self.done[_canonical_key(entry["key"])] = CompareRun(**entry["run"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise VitqError(f"{path} line {number} is not a compare run ({err}); remove it or drop "
                                    "--resume") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            path.write_text("", encoding="utf-8")

    def add(self, key: str, run: CompareRun) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "run": asdict(run)}) + "\n")


def _canonical_key(key: str) -> str:
    """A journaled run key as the current code writes it: its configuration re-validated, so settings added
    since the line was written take their defaults (every new setting defaults to the old behaviour) and a line
    from before a setting existed still matches the same run. A key that no longer validates stays as it is."""
    fields = json.loads(key)
    try:
        fields["config"] = QuantConfig.model_validate(fields["config"]).model_dump(mode="json")
    except (KeyError, TypeError, ValueError):
        return key
    return json.dumps(fields, sort_keys=True)


def _run_key(args: argparse.Namespace, name: str, label: str, config: QuantConfig, split: Split) -> str:
    """Everything a compare run's numbers depend on (and its label in the report), as one string."""
    checkpoint = _checkpoint(args)
    return json.dumps({"model": name, "checkpoint": None if checkpoint is None else str(checkpoint),
                       "data": str(_data_dir(args)), "label": label, "config": config.model_dump(mode="json"),
                       "eval_images": hashlib.sha256(json.dumps(split.eval).encode()).hexdigest()[:16],
                       "batch_size": args.batch_size}, sort_keys=True)


def _compare_run(model: nn.Module, name: str, label: str, config: QuantConfig, cache: ImageCache, split: Split,
                 args: argparse.Namespace, float_top1: float | None, journal: Journal) -> CompareRun:
    """Quantize (a copy of) ``model`` and evaluate it on ``split`` as the report's ``label``;
    ``float_top1=None`` for the float run. Reuses a journaled run with the same key."""
    key = _run_key(args, name, label, config, split)
    setting = FLOAT if config.method == FLOAT else f"W{config.w_bits}A{config.a_bits}"
    if key in journal.done:
        run = journal.done[key]
        print(f"seed {split.seed}: {label} {setting}: top-1 {run.top1:.2f} % (from {journal.path.name})")
        return run
    qmodel, calib_seconds = _quantize(model, name, config, cache, split, progress=_progress(args), inplace=False)
    result = _evaluate(qmodel, cache, split, args)
    print(f"seed {split.seed}: {label} {setting}: {result.summary()}, calibration {calib_seconds:.1f} s")
    run = CompareRun(method=label, setting=setting, seed=split.seed, n_images=result.n_images,
                     top1=result.top1, top5=result.top5,
                     float_top1=result.top1 if float_top1 is None else float_top1,
                     calib_seconds=calib_seconds, eval_seconds=result.seconds,
                     size_mb=model_size(qmodel).quantized_bytes / MB)
    journal.add(key, run)
    return run


def _compare_meta(args: argparse.Namespace, cache: ImageCache, splits: Sequence[Split],
                  reference: str | None) -> list[tuple[str, str]]:
    """The provenance lines at the top of the compare report."""
    checkpoint = _checkpoint(args)
    meta = [
        ("date", datetime.now().astimezone().isoformat(timespec="seconds")),
        ("command", f"`vitq {shlex.join(args.argv)}`"),
        ("model", _model_name(args)),
        ("checkpoint", "timm pretrained weights" if checkpoint is None
         else f"{checkpoint} (sha256 {sha256_prefix(checkpoint)}…)"),
        ("data", str(cache.dataset.root)),
        ("evaluation images", f"{len(splits[0].eval)} per seed (calibration: {len(splits[0].calib)}, disjoint)"),
        ("seeds", ", ".join(str(s.seed) for s in splits)),
        ("machine", machine_summary()),
    ]
    return meta + ([("paired reference", reference)] if reference else [])


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method variant x bit setting against float, per seed on the same images; writes md, csv and png."""
    plan, settings = _compare_plan(args)
    reference = _reference(args.reference, [variant for variant, _ in plan])
    seeds = [_parse_seed(text) for text in _parse_list(args.seeds, "seeds")]
    if args.out_dir is None:
        if args.preset != "leaderboard":
            raise VitqError("compare needs --out-dir DIR (the folder for the report and the run journal)")
        args.out_dir = LEADERBOARD_DIR
    grid = _compare_grid(args, plan, seeds)
    calib_size = grid[seeds[0]][0][1].calib_size
    name = _model_name(args)
    model = _load_float_model(args)
    cache = ImageCache(_data_dir(args), model, progress=_progress(args))
    splits = [cache.split(calib_size, seed, args.limit) for seed in seeds]
    cache.tensors(sorted({i for s in splits for i in s.calib + s.eval}))  # decode the whole grid's images once
    journal = Journal(args.out_dir / JOURNAL_FILE, resume=args.resume)
    runs = []
    for split in splits:
        float_config = make(QuantConfig, method=FLOAT, calib_size=calib_size, seed=split.seed)
        baseline = _compare_run(model, name, FLOAT, float_config, cache, split, args, float_top1=None,
                                journal=journal)
        runs.append(baseline)
        runs += [_compare_run(model, name, label, config, cache, split, args, float_top1=baseline.top1,
                              journal=journal)
                 for label, config in grid[split.seed]]
    meta = _compare_meta(args, cache, splits, reference)
    paths = write_compare_report(args.out_dir, f"vitq compare: {name}", meta, runs, settings, reference=reference)
    if args.preset == "leaderboard":
        paths["leaderboard"] = write_leaderboard(args.out_dir / "leaderboard.md", name, meta, runs, settings)
    print(text_table(summary_columns(reference), summary_rows(runs, reference)), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ====================================================================== entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``vitq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help / --version, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 0
    args.argv = argv
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.run(args)
    except (VitqError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"vitq: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
