"""The ``vitq`` command line: ``methods``, ``inspect``, ``quantize``, ``eval``, ``sensitivity``, ``compare`` and
``export``.

    vitq methods                      # every method: paper, kind, options with defaults
    vitq inspect --method percentile --w-bits 4 --a-bits 4 --override head=8
    vitq quantize --method minmax --w-bits 8 --a-bits 8 --output runs/minmax_w8a8
    vitq eval --quantized runs/minmax_w8a8 --json runs/minmax_w8a8/eval.json
    vitq eval --method float --limit 100
    vitq export runs/minmax_w8a8 --format onnx --output runs/minmax_w8a8.onnx
    vitq eval --backend onnxruntime --model runs/minmax_w8a8.onnx --threads 2
    vitq eval --quantized runs/minmax_w8a8 --backend integer
    vitq sensitivity --method percentile --w-bits 4 --a-bits 4 --out-dir runs/sensitivity
    vitq compare --methods minmax,percentile --bits W8A8,W6A6,W4A4 --seeds 0,1,2 --out-dir runs/compare
    vitq compare --methods "dopq-vit[softmax=log2],dopq-vit[softmax=tanq]" --reference "dopq-vit[softmax=log2]" \
        --out-dir runs/softmax

Calibration and evaluation images come from one folder, split by ``--calib-size`` and ``--seed``
(:func:`vitq.data.split_calib_eval`), so a run is reproducible from its seed. Every problem a
user can cause is printed as one line ``vitq: error: <message>`` and exits with code 2 (Ctrl-C: 130, a bug: one
line and 1). Outputs are checked before any work and written whole at the end, or not at all
(:mod:`vitq.files`); an existing one is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import vitq
from vitq import distributed
from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE
from vitq.config import OVERRIDE_FORMS
from vitq.data.folders import LABEL_FILES
from vitq.data.loader import MAX_DEFAULT_WORKERS
from vitq.device import DEVICE_CHOICES, resolve_device
from vitq.errors import VitqError
from vitq.eval.errors import PointError
from vitq.eval.sensitivity import point_sensitivity, quantized_slots
from vitq.eval.size import model_size
from vitq.experiment import runs
from vitq.experiment.compare import (
    DEFAULT_BITS,
    DEFAULT_METHODS,
    DEFAULT_SEEDS,
    JOURNAL_FILE,
    LEADERBOARD_DIR,
    PRESETS,
    CompareSpec,
    run_compare,
)
from vitq.experiment.executors import EXECUTORS, ExecutorSpec
from vitq.experiment.grammar import parse_option, parse_seed
from vitq.experiment.runs import DEFAULT_MODEL, MB, MODEL_FILE, QUANTIZE_FILE, SQNR_IMAGES, ConfigRequest, RunSpec
from vitq.export.matmul_nbits import ACCURACY_LEVELS
from vitq.export.onnx import DEFAULT_OPSET, export_onnx
from vitq.files import atomic_folder, check_file_output, check_folder_output, write_json, write_text
from vitq.methods import method_class, method_names
from vitq.methods.base import weight_sensitivity_config
from vitq.mixed_precision import (
    BUDGET_KINDS,
    DEFAULT_MENU,
    Budget,
    allocate,
    bit_sensitivities,
    check_menu,
    overrides_text,
    read_overrides_file,
)
from vitq.models.hf import is_hf_name, write_hf_folder
from vitq.models.registry import create_architecture, create_model
from vitq.quantized_model import QuantizedModel
from vitq.report import text_table
from vitq.report.compare import summary_columns, summary_rows
from vitq.report.sensitivity import COLUMNS, JSON_FILE, PLOT_FILE, TABLE_FILE, write_sensitivity
from vitq.report.sensitivity import rows as sensitivity_rows
from vitq.targets import TARGETS, target_names

EXIT_USER_ERROR, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 2, 1, 130
WORST_POINTS = 5
#: the allocation written by "vitq sensitivity --budget"
OVERRIDES_FILE = "overrides.txt"
BACKENDS = ("torch", "onnxruntime", "openvino", "integer")
#: the backends that evaluate an exported file (--model) rather than a torch model
FILE_BACKENDS = ("onnxruntime", "openvino")
EXPORT_FORMATS = ("onnx", "onnxruntime", "openvino")


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


def _bits_menu(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated bit-widths (:func:`vitq.mixed_precision.check_menu`)."""
    try:
        return check_menu([int(part) for part in text.split(",")])
    except (ValueError, VitqError) as err:
        raise argparse.ArgumentTypeError(f"expected bit-widths like 2,3,4,6,8, got {text!r} ({err})") from None


def _seed(text: str) -> int:
    """argparse type: a seed (:func:`vitq.experiment.grammar.parse_seed`)."""
    try:
        return parse_seed(text)
    except VitqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


CHECKPOINT_HELP = (f"local .safetensors state dict (default: $VITQ_ASSETS/{DEIT_TINY_CHECKPOINT} for {DEFAULT_MODEL} "
                   "if present, else timm's pretrained download)")


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", help=f"timm model name, or hf:DIR / hf:OWNER/NAME for a HuggingFace transformers "
                                   f"ViT/DeiT checkpoint (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"where the model runs: {DEVICE_CHOICES} (default auto: the first CUDA GPU, else the CPU)")
    p.add_argument("--workers", type=_int_at_least(0, "non-negative"), metavar="N",
                   help="image loader worker processes (default: one per CPU core but one, at most "
                        f"{MAX_DEFAULT_WORKERS}; 0 decodes in the main process)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _method_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method", choices=method_names(), help="quantization method (default percentile)")
    p.add_argument("--w-bits", type=int, help="weight bits, 2..8 (default 8)")
    p.add_argument("--a-bits", type=int, help="activation bits, 2..8 (default 8); 16: weight-only, activations float")
    return p


def _tuning_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--override", action="append", default=[], metavar="PATTERN=VALUE",
                   help=f"per-point override: {OVERRIDE_FORMS} (repeatable)")
    p.add_argument("--overrides-file", type=Path, metavar="FILE",
                   help="overrides, one PATTERN=VALUE per line ('#' comments), applied before --override (e.g. the "
                        "overrides.txt of 'vitq sensitivity --budget')")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option; VALUE is parsed as JSON when possible, else kept as text (repeatable)")
    p.add_argument("--outliers", metavar="top_k=N|threshold=X",
                   help="keep the outlier input channels of the post-LayerNorm Linear layers (and their weight "
                        "columns) float: the N widest on the calibration images, or those whose max |x| exceeds X "
                        "(append ,roles=post_ln+post_gelu for other inputs; minmax and percentile)")
    p.add_argument("--deploy", choices=target_names(),
                   help="shape the quantizers for a runtime's integer kernels (integer zero points; openvino also "
                        f"{' '.join(TARGETS['openvino'].overrides)}, applied before --override)")
    p.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream and attention heads by randomized Hadamard matrices first (exact "
                        "in float; spreads outlier channels; ViT/DeiT)")
    return p


def _recon_options(*, checkpoint: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--reconstruct", action="store_true",
                   help="block reconstruction after calibration (AdaRound weights + LSQ activation steps, on the "
                        "calibration images; pair it with a larger --calib-size, e.g. 256)")
    p.add_argument("--recon", action="append", default=[], metavar="KEY=VALUE",
                   help="reconstruction setting (implies --reconstruct), e.g. iterations=100, batch_size=16, "
                        "drop_prob=0.5 (QDrop), loss=fisher (mse, fisher, aphq, global, fima: docs/recon_losses.md); "
                        "VALUE is parsed as JSON (repeatable)")
    if checkpoint:
        p.add_argument("--recon-checkpoint", type=Path, metavar="DIR",
                       help="save the reconstruction after every block here, and resume from it if it is there")
    return p


def _data_options(*, seed: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", type=Path, help=f"ImageNet image folder (default $VITQ_ASSETS/{IMAGENET_SAMPLE})")
    p.add_argument("--labels", type=Path, metavar="FILE",
                   help="labels of a flat folder of ILSVRC2012_val_* images: one class index (0..999) or wnid per "
                        "line, a CSV of file,label, or Kaggle's LOC_val_solution.csv (default: "
                        f"{', '.join(LABEL_FILES)} in the folder)")
    p.add_argument("--calib-size", type=_positive_int, help="number of calibration images (default 32)")
    if seed:
        p.add_argument("--seed", type=_seed,
                       help="selects the calibration images and seeds the method (default 0)")
    return p


def _eval_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--batch-size", type=_positive_int, default=64, help="evaluation batch size (default 64)")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate only the first N evaluation images")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``vitq`` argument parser and its subcommands."""
    parser = _Parser(prog="vitq", description="Post-training quantization of Vision Transformers.")
    parser.add_argument("--version", action="version", version=f"vitq {vitq.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common, method, tuning = _common_options(), _method_options(), _tuning_options()

    p = sub.add_parser("methods", help="list every method: its paper, kind and options with their defaults")
    p.add_argument("names", nargs="*", metavar="METHOD", help="only these methods (default: all)")
    p.set_defaults(run=cmd_methods)

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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder and --json file")
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("eval", parents=[common, method, tuning, _recon_options(checkpoint=True),
                                        _data_options(seed=True), _eval_options()],
                       help="top-1/top-5 on the evaluation split (quantizing first, or --quantized DIR)")
    p.add_argument("--quantized", type=Path, metavar="DIR", help="evaluate the model saved by 'vitq quantize'")
    p.add_argument("--sqnr", action="store_true", help="print the per-point SQNR table (and put it in the JSON)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="torch: the fake-quant model (default); onnxruntime: the ONNX file given as --model "
                        "FILE.onnx (written by 'vitq export'), with --threads intra-op threads; openvino: the IR "
                        "folder given as --model DIR (written by 'vitq export --format openvino'); integer: the "
                        "integer-only runtime (I-ViT kernels) compiled from the quantized ViT/DeiT")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("export", help="write a model saved by 'vitq quantize' in a deployment format")
    p.add_argument("quantized", type=Path, metavar="QUANTIZED_DIR", help="folder written by 'vitq quantize --output'")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx",
                   help="onnx: QuantizeLinear/DequantizeLinear graph with int8 weights, for any ONNX runtime "
                        "(default); onnxruntime: that graph with onnxruntime's fusions applied and biases folded "
                        "into its integer GEMMs (faster, onnxruntime only); openvino: OpenVINO IR (a folder with "
                        "model.xml and model.bin) for OpenVINO's int8 kernels")
    p.add_argument("--output", type=Path, required=True, metavar="PATH",
                   help="the file to write (FILE.onnx), or the folder for --format openvino")
    p.add_argument("--opset", type=_int_at_least(13, "--opset"), default=DEFAULT_OPSET,
                   help="ONNX opset, >= 13 for per-channel QDQ (default %(default)s)")
    p.add_argument("--packed-weights", action="store_true",
                   help="--format onnxruntime: Linear weights of 2 to 4 bits stored packed, two per byte, and run by "
                        "onnxruntime's MatMulNBits (a smaller file; see docs/deployment.md)")
    p.add_argument("--nbits-accuracy", choices=tuple(ACCURACY_LEVELS), default="fp32",
                   help="how MatMulNBits computes: fp32 (the fake-quant model's arithmetic; default) or int8 (its "
                        "input quantized per block at run time: faster, one more rounding)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("convert", help="write a float timm ViT/DeiT (--model, --checkpoint) as a HuggingFace "
                                       "transformers folder, which --model hf:DIR and transformers read back")
    p.add_argument("--to", choices=("hf",), required=True, help="hf: a transformers folder (config.json, "
                   "model.safetensors, preprocessor_config.json)")
    p.add_argument("--model", help=f"timm model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", type=Path, help=CHECKPOINT_HELP)
    p.add_argument("--output", type=Path, required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --output folder")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("sensitivity", parents=[common, method, tuning, _data_options(seed=True)],
                       help="what quantizing each point alone costs (KL to float, top-1, SQNR, Hessian trace) on the "
                            "calibration images: a ranked table, JSON and a plot")
    p.add_argument("--out-dir", type=Path, required=True, metavar="DIR",
                   help=f"folder for {TABLE_FILE}, {JSON_FILE} and {PLOT_FILE}")
    p.add_argument("--images", type=_positive_int, metavar="N",
                   help="measure on the first N calibration images (default: all of them)")
    p.add_argument("--hutchinson", type=_int_at_least(0, "non-negative"), default=8, metavar="N",
                   help="Rademacher samples of the Hutchinson Hessian-trace estimate for weights (default "
                        "%(default)s; 0 skips it)")
    p.add_argument("--budget", action="append", default=[], metavar="KIND=VALUE",
                   help=f"also allocate bits per point under a budget ({', '.join(BUDGET_KINDS)}; one per role, "
                        "repeatable) and write the allocation as overrides.txt for --overrides-file")
    p.add_argument("--menu", type=_bits_menu, default=",".join(map(str, DEFAULT_MENU)), metavar="BITS,...",
                   help="bit-widths the allocation chooses from (default %(default)s)")
    p.add_argument("--top", type=_int_at_least(0, "non-negative"), default=15, metavar="N",
                   help="print the N most sensitive points (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out-dir")
    p.set_defaults(run=cmd_sensitivity)

    p = sub.add_parser("compare", parents=[common, tuning, _recon_options(checkpoint=False),
                                           _data_options(seed=False), _eval_options()],
                       help="methods x bit settings x seeds against float: markdown, CSV and a plot")
    p.add_argument("--methods",
                   help="comma-separated methods, each optionally with its own options in brackets, e.g. "
                        "'dopq-vit[softmax=log2;target=mean]' (merged over --option; the text is the report "
                        "label); 'recon=true' or 'recon.KEY=VALUE' in the brackets reconstruct that variant only, "
                        f"e.g. 'dopq-vit[recon.iterations=100]' (default {DEFAULT_METHODS})")
    p.add_argument("--preset", choices=PRESETS,
                   help="leaderboard: every calibration-only method at W8A8, W6A6, W4A4, W3A3 (and the settings a "
                        "method adds, e.g. W3A4 for gptq/erq), writing leaderboard.md next to compare.md (default "
                        f"--out-dir {LEADERBOARD_DIR})")
    p.add_argument("--reference", metavar="LABEL",
                   help="one of the --methods labels: add the paired top-1 difference to it (per seed, same images)")
    p.add_argument("--bits", help=f"comma-separated WxAy settings (default {DEFAULT_BITS})")
    p.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds (default %(default)s)")
    p.add_argument("--out-dir", type=Path, metavar="DIR",
                   help=f"folder for compare.md, compare.csv, compare.png and the run journal {JOURNAL_FILE}")
    p.add_argument("--resume", action="store_true",
                   help=f"reuse the runs already in DIR/{JOURNAL_FILE} that match exactly (same model, data, "
                        "configuration, seed and evaluation images) instead of running them again")
    p.add_argument("--overwrite", action="store_true",
                   help=f"start a new DIR/{JOURNAL_FILE} over an existing one (default: refuse; see --resume)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the (method, bits, seed) runs are quantized and evaluated: local, one after the other "
                        "in this process (default), or ray, one Ray task each (one GPU per task on a CUDA device, "
                        "else one CPU core) while this process keeps the journal and the report; needs "
                        'pip install "vitq[ray]"')
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="with --executor ray: the Ray cluster to run on, as ray.init takes it ('auto', "
                        "'ray://HOST:10001'; default: start a local Ray for this command and stop it at the end)")
    p.set_defaults(run=cmd_compare)
    return parser


# ====================================================================== from arguments to specs


def _run_spec(args: argparse.Namespace) -> RunSpec:
    """The model, data and evaluation settings of the command line (defaults filled in)."""
    return RunSpec.resolve(args.model, getattr(args, "checkpoint", None), getattr(args, "data", None),
                           batch_size=getattr(args, "batch_size", 64), limit=getattr(args, "limit", None),
                           progress=not args.no_progress, device=args.device, workers=args.workers,
                           labels=getattr(args, "labels", None))


def _request(args: argparse.Namespace) -> ConfigRequest:
    """The quantization settings of the command line, unvalidated (``ConfigRequest.build`` validates)."""
    return ConfigRequest(
        method=getattr(args, "method", None), w_bits=getattr(args, "w_bits", None),
        a_bits=getattr(args, "a_bits", None), calib_size=getattr(args, "calib_size", None),
        seed=getattr(args, "seed", None), options=dict(parse_option(text) for text in args.option),
        overrides=(*(read_overrides_file(args.overrides_file) if args.overrides_file else ()), *args.override),
        deploy=getattr(args, "deploy", None), outliers=getattr(args, "outliers", None),
        rotate=getattr(args, "rotate", False), recon=dict(parse_option(text) for text in getattr(args, "recon", [])),
        reconstruct=getattr(args, "reconstruct", False))


def _sqnr_table(errors: Sequence[PointError]) -> str:
    return text_table(["point", "SQNR dB"], [[e.point, e.sqnr_db] for e in errors])


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


def _recon_checkpoint(args: argparse.Namespace) -> Path | None:
    """``--recon-checkpoint DIR``, checked before any work: a folder (its checkpoint is resumed) or nothing yet."""
    if args.recon_checkpoint is None:
        return None
    return check_folder_output(args.recon_checkpoint, overwrite=True, what="--recon-checkpoint")


def _json_output(args: argparse.Namespace) -> Path | None:
    """``--json PATH``, checked before any work (not a folder; an existing file only with ``--overwrite``)."""
    if args.json is None:
        return None
    return check_file_output(args.json, overwrite=args.overwrite, what="--json")


# ====================================================================== subcommands


def cmd_methods(args: argparse.Namespace) -> int:
    """Every method (or the named ones): paper, calibration-only or reconstruction-based, options."""
    for name in args.names or method_names():
        cls = method_class(name)
        kind = "reconstruction-based" if cls.reconstructs else "calibration-only"
        print(f"{name} ({kind}): {cls.summary}")
        print(f"  paper: {cls.paper if cls.paper is not None else 'none (a baseline)'}")
        print(f"  docs: docs/methods/{name}.md")
        rows = cls.option_rows()
        if rows:
            table = text_table(["option", "type", "default", "description"], [list(row) for row in rows])
            print("".join(f"  {line}\n" for line in table.splitlines()), end="")
        else:
            print("  options: none")
        print()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print every quantizer slot: name, role and quantizer (or float). No data, no calibration."""
    resolve_device(args.device)  # runs nothing on it, but a device this machine lacks is refused like elsewhere
    name = args.model or DEFAULT_MODEL
    model = create_model(name, checkpoint=args.checkpoint) if args.checkpoint else create_architecture(name)
    qmodel = vitq.prepare(model, _request(args).build(), model_name=name, inplace=True)
    specs = qmodel.quant_specs()
    rows = [[slot.name, slot.role, _spec_summary(specs[slot.name])] for slot in qmodel.slots()]
    n_quantized = sum(spec is not None for spec in specs.values())
    print(f"{name} ({qmodel.family} family), {qmodel.config.label}: "
          f"{len(rows)} quantizer slots, {n_quantized} quantized")
    print(text_table(["slot", "role", "quantizer"], rows), end="")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize on the calibration split; save the model and ``quantize.json`` in ``--output`` (the folder is
    written whole at the end, or not at all)."""
    output = check_folder_output(args.output, overwrite=args.overwrite, what="--output")
    json_path, recon_checkpoint = _json_output(args), _recon_checkpoint(args)
    spec, config = _run_spec(args), _request(args).build()
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(config.calib_size, config.seed)
    qmodel, calib_seconds = runs.quantize_on_split(model, spec.model, config, cache, split, progress=spec.progress,
                                                   inplace=True, recon_checkpoint=recon_checkpoint)
    size = model_size(qmodel)
    worst = runs.worst_points(runs.split_sqnr(qmodel, cache, split), WORST_POINTS)
    with atomic_folder(output) as folder:
        file_bytes = vitq.save(qmodel, folder / MODEL_FILE, packed=not args.no_pack).stat().st_size
        record = runs.run_record(
            spec.model, config, size=size,
            checkpoint=None if spec.checkpoint is None else str(spec.checkpoint), data=str(cache.dataset.root),
            calibration_images=[{"index": i, "file": f} for i, f in zip(split.calib, cache.file_names(split.calib),
                                                                         strict=True)],
            calib_seconds=calib_seconds, file_bytes=file_bytes, worst_points=runs.sqnr_json(worst))
        write_json(folder / QUANTIZE_FILE, record)
    if json_path is not None:
        write_json(json_path, record)
    print(runs.describe(qmodel, calib_seconds))
    print(f"size: {size.summary()}")
    print(f"worst {len(worst)} points by SQNR (on {min(len(split.calib), SQNR_IMAGES)} calibration images):")
    print(_sqnr_table(worst), end="")
    print(f"saved {output / MODEL_FILE} ({file_bytes / MB:.2f} MB) and {output / QUANTIZE_FILE}")
    return 0


def _load_saved(args: argparse.Namespace, device: str) -> tuple[QuantizedModel, runs.SavedRecord]:
    """``--quantized DIR``'s model (on ``device``) and record; refuses options that contradict the saved model."""
    folder: Path = args.quantized
    qmodel, record = runs.read_quantized_dir(folder, device)
    saved = qmodel.config
    _refuse_conflicts(f"--quantized {folder}", {
        "--model": (args.model, qmodel.model_name), "--method": (args.method, saved.method),
        "--w-bits": (args.w_bits, saved.w_bits), "--a-bits": (args.a_bits, saved.a_bits),
        "--calib-size": (args.calib_size, saved.calib_size), "--seed": (args.seed, saved.seed)},
        ["--override/--option/--outliers/--rotate (the saved model is already quantized)"]
        if args.override or args.option or args.outliers or args.rotate else [])
    return qmodel, record


def _refuse_conflicts(what: str, given: dict[str, tuple[Any, Any]], extra: list[str]) -> None:
    """Refuse command-line values that differ from the saved ones: a saved model is evaluated as it was made,
    on every image but its own calibration images."""
    conflicts = [f"{flag} {mine} (saved: {theirs})" for flag, (mine, theirs) in given.items()
                 if mine is not None and mine != theirs] + extra
    if conflicts:
        raise VitqError(f"{what} conflicts with {'; '.join(conflicts)} (a saved model is evaluated on every image "
                        "but its own calibration images)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1/top-5 on the evaluation split of a freshly quantized (or float, or saved) model. Under torchrun the
    evaluation images are sharded across the processes (:mod:`vitq.distributed`): rank 0 quantizes and shares its
    model, every rank evaluates its shard, rank 0 reports the summed counts."""
    json_path, recon_checkpoint = _json_output(args), _recon_checkpoint(args)
    if args.backend in FILE_BACKENDS:
        return _eval_file(args, json_path)
    spec = _run_spec(args)
    context = distributed.init(spec.device)
    spec = replace(spec, device=context.device, progress=spec.progress and context.is_main)
    try:
        return _eval_torch(args, spec, context, json_path, recon_checkpoint)
    finally:
        distributed.close(context)


def _eval_torch(args: argparse.Namespace, spec: RunSpec, context: distributed.Context, json_path: Path | None,
                recon_checkpoint: Path | None) -> int:
    if args.quantized:  # every rank reads the same file
        qmodel, record = _load_saved(args, spec.device)
        calib_seconds = record.calib_seconds
        cache = spec.image_cache(qmodel.model)
        split = runs.saved_split(cache, qmodel.config, record.calibration_files, args.limit)
    else:
        config = _request(args).build()
        model = spec.float_model()
        cache = spec.image_cache(model)
        split = cache.split(config.calib_size, config.seed, args.limit)
        qmodel, calib_seconds = None, None
        if context.is_main:
            qmodel, calib_seconds = runs.quantize_on_split(model, spec.model, config, cache, split,
                                                           progress=spec.progress, inplace=True,
                                                           recon_checkpoint=recon_checkpoint)
        qmodel = distributed.broadcast_model(qmodel, context)
    evaluated: torch.nn.Module = qmodel
    if args.backend == "integer":
        from vitq.export.integer_vit import IntegerViT

        evaluated = IntegerViT.compile(qmodel, cache.tensors(split.calib, "loading calibration images")[0])
    result = runs.evaluate_on_split(evaluated, cache, split, spec, context)
    if not context.is_main:
        return 0
    size = model_size(qmodel)
    record = runs.run_record(qmodel.model_name, qmodel.config, result=result, size=size,
                             calib_seconds=calib_seconds, backend=args.backend, device=spec.device,
                             processes=context.world_size)
    print(runs.describe(qmodel, calib_seconds) + (" — integer-only runtime" if args.backend == "integer" else ""))
    print(result.summary() + (f" ({context.world_size} processes)" if context.distributed else ""))
    print(f"size: {size.summary()}")
    if args.sqnr:
        errors = runs.split_sqnr(qmodel, cache, split)
        print(f"per-point SQNR (on {min(len(split.calib), SQNR_IMAGES)} calibration images):")
        print(_sqnr_table(errors), end="")
        record["sqnr"] = runs.sqnr_json(errors)
    if json_path is not None:
        write_json(json_path, record)
    return 0


def _eval_file(args: argparse.Namespace, json_path: Path | None) -> int:
    """``vitq eval --backend onnxruntime --model FILE.onnx`` or ``--backend openvino --model DIR``: the exported
    file on the same split, with the same JSON keys as the torch backend."""
    backend = args.backend
    if resolve_device(args.device).type != "cpu" and args.device.strip().lower() != "auto":
        raise VitqError(f"--backend {backend} runs on the CPU; drop --device {args.device}")
    what = "FILE.onnx (a file written by 'vitq export')" if backend == "onnxruntime" else \
        "DIR (a folder written by 'vitq export --format openvino')"
    if args.model is None:
        raise VitqError(f"--backend {backend} needs --model {what}")
    torch_only = {"--quantized": args.quantized, "--method": args.method, "--w-bits": args.w_bits,
                  "--a-bits": args.a_bits, "--checkpoint": args.checkpoint, "--sqnr": args.sqnr or None,
                  "--override/--option/--deploy/--outliers/--rotate": args.override or args.option or args.deploy
                  or args.outliers or args.rotate or None}
    given = [flag for flag, value in torch_only.items() if value is not None]
    if given:
        raise VitqError(f"--backend {backend} evaluates the exported file as it is; drop {', '.join(given)}")
    if backend == "onnxruntime":
        from vitq.eval.ort import OrtModel

        model = OrtModel(Path(args.model), threads=args.threads)
        files = [model.path]
    else:
        from vitq.eval.ov import OpenVinoModel

        model = OpenVinoModel(Path(args.model), threads=args.threads)
        files = model.files
    header = model.header
    saved = header.config
    _refuse_conflicts(f"--model {model.path}", {"--calib-size": (args.calib_size, saved.calib_size),
                                                "--seed": (args.seed, saved.seed)}, [])
    spec = _run_spec(args)
    cache = spec.image_cache(create_architecture(header.model_name))
    split = runs.saved_split(cache, saved, header.calibration_files, args.limit)
    result = runs.evaluate_on_split(model, cache, split, spec)
    float_points = [p.slot for p in header.points if p.form == "float path"]
    record = runs.run_record(header.model_name, saved, result=result, backend=backend,
                             **{"onnx_file" if backend == "onnxruntime" else "openvino_file": str(model.path)},
                             file_mb=sum(f.stat().st_size for f in files) / MB, float_path_points=float_points)
    print(f"{model.path} ({header.model_name}, {saved.label}) on {backend}, {len(float_points)} points on a float "
          "path")
    print(result.summary())
    if json_path is not None:
        write_json(json_path, record)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model saved by ``vitq quantize`` (``--format onnx``, ``onnxruntime`` or ``openvino``), naming every
    point left on a float path, and for OpenVINO every point its int8 kernels do not take."""
    if args.format != "onnxruntime" and (args.packed_weights or args.nbits_accuracy != "fp32"):
        raise VitqError("--packed-weights and --nbits-accuracy need --format onnxruntime (MatMulNBits is an "
                        "onnxruntime operator)")
    if args.nbits_accuracy != "fp32" and not args.packed_weights:
        raise VitqError("--nbits-accuracy needs --packed-weights")
    if args.format == "openvino":
        output = check_folder_output(args.output, overwrite=args.overwrite, what="--output")
    else:
        output = check_file_output(args.output, overwrite=args.overwrite, what="--output")
    qmodel, record = runs.read_quantized_dir(args.quantized)
    if args.format == "openvino":
        from vitq.export.openvino import export_openvino

        exported = export_openvino(qmodel, output, calibration_files=record.calibration_files)
        written, megabytes = exported.xml, (exported.xml.stat().st_size + exported.bin.stat().st_size) / MB
        slow = exported.slow_points
    else:
        if args.format == "onnxruntime":
            from vitq.export.ort import export_onnxruntime

            export = functools.partial(export_onnxruntime, packed_weights=args.packed_weights,
                                       accuracy=args.nbits_accuracy)
        else:
            export = export_onnx
        exported = export(qmodel, output, opset=args.opset, calibration_files=record.calibration_files)
        written, megabytes = exported.path, exported.path.stat().st_size / MB
        slow = [(f"{p.slot} ({p.quantizer})", f"stays on a float path: {p.reason}") for p in exported.float_points]
    forms = Counter(point.form for point in exported.points)
    print(f"wrote {written} ({megabytes:.2f} MB): " + ", ".join(f"{n} {form}" for form, n in sorted(forms.items())))
    for slot, why in slow:
        print(f"vitq: warning: {slot} {why}", file=sys.stderr)
    if slow and args.format == "openvino":
        print(f"vitq: warning: {len(slow)} points do not run on OpenVINO's int8 kernels; quantizing with --deploy "
              "openvino gives every point the form they take", file=sys.stderr)
    elif slow:
        for hint in _float_path_hints(exported.float_points):
            print(f"vitq: warning: {hint}", file=sys.stderr)
    return 0


def _float_path_hints(points: list) -> list[str]:
    """What to change so that the float paths of an ONNX export get an integer form (measured in
    benchmarks/results/deploy_speed.md: float paths make the onnxruntime graph several times slower)."""
    hints = []
    fractional = [p for p in points if "fractional zero point" in p.reason]
    if fractional:
        hints.append(f"{len(fractional)} points have fractional zero points: quantizing with --deploy onnxruntime "
                     "rounds them (integer QDQ)")
    softmax = [p for p in points if p.role == "softmax"]
    if softmax:
        hints.append(f"{len(softmax)} softmax quantizers stay on a float path, which makes onnxruntime several times "
                     "slower; --override '*attn.softmax=uniform:8' gives them an integer form")
    return hints


def cmd_convert(args: argparse.Namespace) -> int:
    """Write a float timm model as a transformers folder (:func:`vitq.models.hf.write_hf_folder`)."""
    output = check_folder_output(args.output, overwrite=args.overwrite, what="--output")
    spec = runs.RunSpec.resolve(model=args.model, checkpoint=args.checkpoint, device="cpu")
    if is_hf_name(spec.model):
        raise VitqError(f"--model {spec.model} is already a transformers checkpoint")
    write_hf_folder(spec.float_model(), output)
    print(f"wrote {output} (read it back with --model hf:{output})")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """Quantize on the calibration split, then measure every point alone on the calibration images (never the
    evaluation images: the ranking is meant to choose precisions)."""
    out_dir = check_folder_output(args.out_dir, overwrite=args.overwrite, what="--out-dir")
    spec, config = _run_spec(args), _request(args).build()
    if config.method == runs.FLOAT:
        raise VitqError("--method float quantizes nothing; choose a quantization method")
    budgets = [Budget.parse(text) for text in args.budget]
    if len({budget.weights for budget in budgets}) < len(budgets):
        raise VitqError("one --budget per role: weights (w-avg-bits, w-size-mb, bops) and activations (a-avg-bits)")
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(config.calib_size, config.seed)
    qmodel, _ = runs.quantize_on_split(model, spec.model, config, cache, split, progress=spec.progress,
                                       inplace=False)
    chosen = split.calib[:args.images] if args.images else split.calib
    images, labels = cache.tensors(chosen, "loading calibration images")
    twin_config = weight_sensitivity_config(config)
    measured = {"hutchinson_samples": args.hutchinson, "seed": config.seed, "progress": spec.progress}
    if twin_config == config:
        results = point_sensitivity(qmodel, images, labels, **measured)
    else:  # the method rewrote the float weights: each weight alone is measured on its round-to-nearest twin
        slots = quantized_slots(qmodel)
        order = {slot.name: i for i, slot in enumerate(slots)}
        twin, _ = runs.quantize_on_split(model, spec.model, twin_config, cache, split, progress=spec.progress,
                                         inplace=False)
        results = sorted(
            point_sensitivity(qmodel, images, labels, **measured,
                              slots=[slot.name for slot in slots if slot.role != "weight"])
            + point_sensitivity(twin, images, labels, **measured,
                                slots=[slot.name for slot in slots if slot.role == "weight"]),
            key=lambda result: order[result.slot])
    allocation_lines = []
    calib = cache.tensors(split.calib, "loading calibration images")[0] if budgets else None
    for budget in budgets:
        costs, sizes = bit_sensitivities(model, config, calib, images, labels, args.menu, budget.weights,
                                         model_name=spec.model, progress=spec.progress, bops=budget.bops)
        bits = allocate(costs, sizes, budget.total_bits(sizes))
        spent = budget.describe(bits, sizes)
        counts = Counter(bits.values())
        print(f"--budget {budget.kind}={budget.value:g}: {spent}; " +
              ", ".join(f"{counts[b]} points at {b} bits" for b in sorted(counts)))
        allocation_lines += [f"# --budget {budget.kind}={budget.value:g}: {spent}, menu "
                             f"{','.join(map(str, args.menu))}, KL costs on {len(chosen)} calibration images",
                             overrides_text(bits)]
    title = f"Per-point sensitivity: {qmodel.model_name}, {config.label}"
    header = [f"- command: `vitq {shlex.join(args.argv)}`",
              f"- {len(chosen)} calibration images (seed {config.seed}); each point quantized alone, the rest float, "
              "with the parameters calibrated for the whole model",
              *([f"- weights measured on `{twin_config.method}`, the round-to-nearest twin: {config.method} rewrites "
                 "the float weights, so no weight can be quantized alone in its model"] if twin_config != config
                else []),
              f"- KL: mean KL(float ‖ point quantized) per image; top-1 on those images; SQNR of the point's own "
              f"input; tr(H)/n: Hutchinson ({args.hutchinson} samples) mean Hessian diagonal of the cross-entropy, "
              "HAWQ Ω = tr(H)/n·‖W − Q(W)‖²"]
    with atomic_folder(out_dir) as folder:
        write_sensitivity(folder, results, header, title)
        if allocation_lines:
            write_text(folder / OVERRIDES_FILE, f"# vitq {shlex.join(args.argv)}\n" + "\n".join(allocation_lines))
    if allocation_lines:
        print(f"wrote {out_dir / OVERRIDES_FILE}: quantize with --overrides-file {out_dir / OVERRIDES_FILE}")
    print(f"{title}: {len(results)} points on {len(chosen)} calibration images, most sensitive first")
    print(text_table(COLUMNS, sensitivity_rows(results)[:args.top]), end="")
    print(f"wrote {out_dir / TABLE_FILE}, {JSON_FILE}, {PLOT_FILE}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method variant x bit setting against float, per seed on the same images; writes md, csv and png."""
    executor = ExecutorSpec(kind=args.executor, ray_address=args.ray_address)
    executor.check()  # before the device is resolved or anything is loaded
    compare = CompareSpec(methods=args.methods, bits=args.bits, seeds=args.seeds, preset=args.preset,
                          reference=args.reference, request=_request(args), out_dir=args.out_dir,
                          resume=args.resume, overwrite=args.overwrite, command=f"vitq {shlex.join(args.argv)}",
                          executor=executor)
    outcome = run_compare(_run_spec(args), compare)
    if outcome.runs:
        print(text_table(summary_columns(outcome.reference), summary_rows(outcome.runs, outcome.reference)), end="")
    print("wrote " + ", ".join(str(p) for p in outcome.paths.values()))
    if outcome.failures:
        total = len(outcome.runs) + len(outcome.failures)
        print(f"vitq: error: {len(outcome.failures)} of {total} runs failed (listed in "
              f"{outcome.paths['markdown']} and {JOURNAL_FILE}; --resume runs them again)", file=sys.stderr)
        # a bug in any failed run is reported as a bug; otherwise the runs failed on the user's input
        return EXIT_INTERNAL_ERROR if any(f.internal for f in outcome.failures) else EXIT_USER_ERROR
    return 0


# ====================================================================== entry point


def main(argv: list[str] | None = None) -> int:
    """Run ``vitq`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code: 2 for a problem with the
    input, 130 when interrupted, 1 for a bug (any other exception, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help / --version, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 0
    args.argv = argv
    try:
        if distributed.launched_by_torchrun() and args.command != "eval":
            raise VitqError(f"under torchrun only 'vitq eval' runs data-parallel; run 'vitq {args.command}' as one "
                            "process")
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        return args.run(args)
    except (VitqError, OSError) as err:
        print(f"vitq: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # objects the interrupt left half-built (a DataLoader iterator whose worker processes were starting) fail
        # in their finalizers as the exception is cleared: noise after a Ctrl-C, never a result
        sys.unraisablehook = lambda unraisable: None
        print("vitq: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug: still one line, with what to report
        print(f"vitq: error: internal error {type(err).__name__}: {_one_line(err)} (please report this with the "
              "command line)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
