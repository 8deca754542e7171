"""One run: what it is run on (:class:`RunSpec`), the config the user asked for (:class:`ConfigRequest`), the
quantization and evaluation of a model on one seed's split, the saved-model folder, and the JSON record of a run.

The CLI and the comparison engine both go through these functions, so ``vitq quantize``, ``vitq eval`` and
``vitq compare`` quantize, evaluate and report a run the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from vitq import distributed
from vitq.api import prepare, quantize
from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE, assets_dir
from vitq.config import OutlierConfig, PointOverride, QuantConfig, ReconConfig, first_error, make
from vitq.data import ImageCache, Split
from vitq.data.loader import default_workers
from vitq.device import model_device, resolve_device
from vitq.errors import VitqError
from vitq.eval.accuracy import EvalResult, ImageHits, evaluate_indices
from vitq.eval.errors import PointError, point_sqnr
from vitq.eval.size import SizeReport
from vitq.experiment.grammar import FLOAT
from vitq.export.checkpoint import load
from vitq.models.registry import create_model
from vitq.quantized_model import QuantizedModel
from vitq.report.runinfo import peak_rss_mb

DEFAULT_MODEL = "deit_tiny_patch16_224"
#: files of a folder written by ``vitq quantize --output``
MODEL_FILE = "model.safetensors"
QUANTIZE_FILE = "quantize.json"
#: calibration images used for the per-point SQNR (a forward pass of the float and quantized model each)
SQNR_IMAGES = 8
#: a variant's option key for its own reconstruction settings (``recon``, ``recon.iterations``, ...)
RECON_KEY = "recon"
MB = 1e6


@dataclass(frozen=True)
class RunSpec:
    """What runs are run on and how they are evaluated: the model (timm name and local checkpoint, ``None`` =
    timm's pretrained download), the image folder, the evaluation batch size and image limit, progress bars, the
    device (a resolved ``torch.device`` string, e.g. ``cpu`` or ``cuda:0``), the image loader's worker
    processes and the labels file of a flat ImageNet validation folder (``None``: the folder's own, if any)."""

    model: str
    checkpoint: Path | None
    data: Path
    batch_size: int = 64
    limit: int | None = None
    progress: bool = True
    device: str = "cpu"
    workers: int = 0
    labels: Path | None = None

    @classmethod
    def resolve(cls, model: str | None = None, checkpoint: Path | None = None, data: Path | None = None,
                device: str | None = None, workers: int | None = None, **rest: Any) -> RunSpec:
        """The spec with the defaults filled in: :data:`DEFAULT_MODEL`, the shipped DeiT-tiny checkpoint for the
        default model when it is present (else the download), the shipped image sample, the ``auto`` device
        (checked here, before any work) and :func:`~vitq.data.loader.default_workers`."""
        model = model or DEFAULT_MODEL
        if checkpoint is None:
            default = assets_dir() / DEIT_TINY_CHECKPOINT
            checkpoint = default if model == DEFAULT_MODEL and default.is_file() else None
        return cls(model, checkpoint, data or assets_dir() / IMAGENET_SAMPLE, device=str(resolve_device(device)),
                   workers=default_workers() if workers is None else workers, **rest)

    def float_model(self) -> nn.Module:
        """The float model, on :attr:`device`."""
        return create_model(self.model, checkpoint=self.checkpoint, device=self.device)

    def image_cache(self, model: nn.Module) -> ImageCache:
        """The image folder, preprocessed for ``model`` and decoded by :attr:`workers` loader processes."""
        return ImageCache(self.data, model, progress=self.progress, workers=self.workers, labels=self.labels)


@dataclass(frozen=True)
class ConfigRequest:
    """The quantization settings as the user gave them, before validation (``None``: the config's default).

    ``options`` are method options (``--option``), ``overrides`` the ``--override`` texts, ``recon`` the
    ``--recon`` reconstruction settings (any of them, or ``reconstruct``, turns reconstruction on)."""

    method: str | None = None
    w_bits: int | None = None
    a_bits: int | None = None
    calib_size: int | None = None
    seed: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    overrides: Sequence[str] = ()
    recon: Mapping[str, Any] = field(default_factory=dict)
    reconstruct: bool = False
    deploy: str | None = None
    outliers: str | None = None
    rotate: bool = False

    def build(self, options: Mapping[str, Any] | None = None, **given: Any) -> QuantConfig:
        """The validated config; ``given`` (e.g. ``method=``) takes precedence and ``options`` (a variant's own)
        are merged over :attr:`options`. A variant's ``recon`` (true: the defaults) and ``recon.KEY`` options
        reconstruct that variant, e.g. ``dopq-vit[recon.iterations=100]``."""
        values = {"method": self.method, "w_bits": self.w_bits, "a_bits": self.a_bits,
                  "calib_size": self.calib_size, "seed": self.seed, "deploy": self.deploy, **given}
        options = {**self.options, **(options or {})}
        recon, reconstruct = dict(self.recon), bool(self.recon) or self.reconstruct
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
        if self.outliers is not None:
            values["outliers"] = OutlierConfig.parse(self.outliers)
        if self.rotate:
            values["rotate"] = True
        return make(QuantConfig, **{k: v for k, v in values.items() if v is not None},
                    overrides=[PointOverride.parse(text) for text in self.overrides], options=options)


def quantize_on_split(model: nn.Module, name: str, config: QuantConfig, cache: ImageCache, split: Split, *,
                      progress: bool, inplace: bool,
                      recon_checkpoint: Path | None = None) -> tuple[QuantizedModel, float]:
    """``model`` quantized with ``config`` on the split's calibration images, and the calibration seconds
    (reconstruction included)."""
    if config.method == FLOAT:  # nothing to calibrate: skip loading the calibration images
        return prepare(model, config, model_name=name, inplace=inplace), 0.0
    images, _ = cache.tensors(split.calib, "loading calibration images")
    images = images.to(model_device(model))  # the images are decoded on the CPU; calibration runs on the model's
    start = time.perf_counter()
    qmodel = quantize(model, config, images, model_name=name, inplace=inplace, progress=progress,
                      recon_checkpoint=recon_checkpoint)
    return qmodel, time.perf_counter() - start


def evaluate_on_split(model: nn.Module, cache: ImageCache, split: Split, spec: RunSpec,
                      context: distributed.Context | None = None) -> EvalResult:
    """Top-1/top-5 of ``model`` on the split's evaluation images, streamed (the cached tensors when the cache
    holds them all, else decoded by ``spec.workers`` loader processes). Under torch.distributed (``context``)
    each process evaluates its shard and every process gets the result of all images, in the split's order."""
    context = context or distributed.Context()
    indices = distributed.shard(split.eval, context.rank, context.world_size)
    dataset, workers = cache.stream(indices)
    start = time.perf_counter()
    hits = evaluate_indices(model, dataset, indices, batch_size=spec.batch_size, workers=workers,
                            progress=spec.progress)
    total = len(split.eval)
    hits = ImageHits(distributed.gather_hits(hits.top1, total, context),
                     distributed.gather_hits(hits.top5, total, context))
    return EvalResult.from_hits(hits, time.perf_counter() - start)


def split_sqnr(qmodel: QuantizedModel, cache: ImageCache, split: Split) -> list[PointError]:
    """Accumulated SQNR of every point on up to :data:`SQNR_IMAGES` calibration images."""
    images, _ = cache.tensors(split.calib[:SQNR_IMAGES], "loading calibration images")
    return point_sqnr(qmodel, images)


def sqnr_json(errors: Sequence[PointError]) -> list[dict[str, Any]]:
    """Per-point SQNR for JSON (an infinite SQNR, i.e. no error at all, becomes ``null``)."""
    return [{"point": e.point, "sqnr_db": e.sqnr_db if math.isfinite(e.sqnr_db) else None} for e in errors]


def run_record(model_name: str, config: QuantConfig, *, result: EvalResult | None = None,
               size: SizeReport | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON record of a run (``vitq quantize --json``, ``vitq eval --json``, every backend): the model,
    method, bits (``None`` for float), calibration size and seed, the whole ``config`` and ``peak_mem_mb``; the
    accuracy keys when evaluated (``top1``, ``top5`` in percent, ``top1_ci95``, ``n_images``, ``seconds``,
    ``images_per_s``); the size keys when ``size`` is given; then ``extra``."""
    quantized = config.method != FLOAT
    record: dict[str, Any] = {
        "model": model_name, "method": config.method,
        "w_bits": config.w_bits if quantized else None, "a_bits": config.a_bits if quantized else None,
        "calib_size": config.calib_size, "seed": config.seed, "config": config.model_dump(mode="json"),
        "peak_mem_mb": peak_rss_mb(),
    }
    if result is not None:
        record |= {"top1": result.top1, "top5": result.top5, "top1_ci95": list(result.top1_ci95),
                   "n_images": result.n_images, "seconds": result.seconds, "images_per_s": result.images_per_s}
    if size is not None:
        record |= {"size_mb": size.quantized_bytes / MB, "float_size_mb": size.float_bytes / MB}
    return record | extra


def worst_points(errors: Sequence[PointError], n: int) -> list[PointError]:
    """The ``n`` points with the lowest SQNR, a NaN SQNR (a broken point) first of all."""
    return sorted(errors, key=lambda e: (not math.isnan(e.sqnr_db), e.sqnr_db))[:n]


class CalibrationImage(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    file: str = Field(min_length=1)


class SavedRecord(BaseModel):
    """What ``quantize.json`` must hold for ``vitq eval --quantized`` (other keys are kept, not needed)."""

    model_config = ConfigDict(extra="allow")

    calib_seconds: float | None = None
    calibration_images: list[CalibrationImage] | None = None

    @property
    def calibration_files(self) -> list[str] | None:
        """The file names of the calibration images (``None``: not recorded)."""
        return None if self.calibration_images is None else [image.file for image in self.calibration_images]


def read_quantized_dir(folder: Path, device: str | None = None) -> tuple[QuantizedModel, SavedRecord]:
    """The model saved in ``folder`` by ``vitq quantize`` (on ``device``; ``None``: the CPU) and its record
    (``quantize.json``; empty without one)."""
    if not folder.is_dir():
        raise VitqError(f"quantized model folder {folder} does not exist")
    qmodel = load(folder / MODEL_FILE, device=device)
    info = folder / QUANTIZE_FILE
    if not info.is_file():
        return qmodel, SavedRecord()
    try:
        record = SavedRecord.model_validate_json(info.read_bytes())
    except OSError as err:
        raise VitqError(f"cannot read {info}: {err}") from None
    except ValidationError as err:
        where, message, _ = first_error(err)
        raise VitqError(f"{info} is not a vitq quantize record: {where or 'file'}: {message}") from None
    if record.calibration_images is not None and len(record.calibration_images) != qmodel.config.calib_size:
        raise VitqError(f"{info} lists {len(record.calibration_images)} calibration images, but the model was "
                        f"calibrated on {qmodel.config.calib_size}")
    return qmodel, record


def saved_split(cache: ImageCache, config: QuantConfig, calibration_files: Sequence[str] | None,
                limit: int | None = None) -> Split:
    """The split of a saved model: its calibration images and, for evaluation, every other image of the folder.

    The calibration images are the files the model was calibrated on (by name, so another folder holding them
    excludes them too); without that list, the seeded split of ``config`` (the same folder gives the same
    images). Never evaluates a model on its own calibration images."""
    if calibration_files is None:
        return cache.split(config.calib_size, config.seed, limit)
    names = set(calibration_files)
    files = cache.file_names(range(len(cache.dataset)))
    calib = [i for i, name in enumerate(files) if name in names]
    evaluation = [i for i, name in enumerate(files) if name not in names]
    if not evaluation:
        raise VitqError(f"{cache.dataset.root} holds only the model's calibration images, none to evaluate on")
    return Split(config.seed, calib, evaluation[:limit])


def describe(qmodel: QuantizedModel, calib_seconds: float | None) -> str:
    """One line: model, method/bits, calibration images and time."""
    config = qmodel.config
    if config.method == FLOAT:
        how = "not quantized"
    else:
        took = "unknown time" if calib_seconds is None else f"{calib_seconds:.1f} s"
        how = f"calibrated on {config.calib_size} images (seed {config.seed}) in {took}"
    return f"{qmodel.model_name}, {config.label}: {how}"
