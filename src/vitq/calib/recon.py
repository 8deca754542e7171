"""Block reconstruction (BRECQ / QDrop style): optimize each stage's quantization so that the quantized stage
reproduces the float stage's output on the calibration images (docs/protocol.md#calibration-protocols,
docs/methods/is-vit.md, docs/protocol.md#like-for-like).

Per stage, in forward order (:func:`reconstruct_model`):

- inputs: the stage's input in the *quantized* model (upstream already reconstructed; with ``drop_input``, each
  element of a mini-batch the *float* model's with probability ``drop_prob``, as QDrop's released code) and the
  target, the *float* model's output of the stage (computed from the float stream with the original weights,
  before anything in the stage changes);
- learnable parts (:mod:`vitq.calib.learnable`): the rounding of every per-row uniform weight (AdaRound), the
  step of every uniform activation quantizer (LSQ, optionally with QDrop's random drop); every other quantizer
  is kept fixed with a straight-through gradient;
- loss, over a random mini-batch of calibration images per iteration (Adam): the stage loss ``settings.loss``
  (:mod:`vitq.calib.losses`; by default ``mean over tokens of ‖f_q(x_q) − f(x)‖²``, summed over channels; the
  others weight that error by BRECQ's Fisher or APHQ-ViT's Hessian diagonal, or look at the model's prediction
  through the float stages after this one) ``+ λ·Σ (1 − |2h − 1|^β)``, with the regulariser off for the first
  ``warmup`` fraction of the iterations and β decayed linearly from ``beta[0]`` to ``beta[1]`` afterwards (BRECQ's
  schedule); with ``normalize`` the stage loss is divided by half its value before learning (APHQ-ViT's released
  code), and ``scale_schedule = "cosine"`` anneals the steps' learning rate to 0 over the stage;
- then the learned values are written back (hard rounding → on-grid weights, learned steps → the quantizers).

With ``unit = "layer"`` (AdaRound's protocol) the unit is one weight layer instead of a stage: each Linear/conv of
the stage in turn is fitted from its input in the quantized model (earlier layers already rounded) to its output in
the float model, the stage's other quantizers staying as they are (with the ``mse`` loss only).

Optional augmentation (``augment = k``): the calibration set gets ``k`` extra copies of every image, each randomly
cropped (a square of 50-100 % of the side, resized back) and flipped (probability ½), drawn from ``seed``.

Reproducible and resumable: the mini-batches and QDrop masks of stage ``i`` come from a generator seeded with
``(seed, i)``; with ``checkpoint_dir`` the model state is saved after every stage and a rerun with the same
directory (and settings) loads it and goes on after the last finished stage, giving the same result as an
uninterrupted run. Memory: one stage's calibration inputs and targets (and the loss's weights), plus one
mini-batch's autograd graph (through the later stages too with ``loss = "global"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from vitq.calib.layer_inputs import weight_layers
from vitq.calib.learnable import AdaRoundWeight, LearnedStep, StraightThrough
from vitq.calib.losses import FloatTail, StageLoss, StageProblem, prepare_loss, squared_error
from vitq.calib.runner import run_batched
from vitq.config import ReconConfig
from vitq.errors import VitqError
from vitq.files import write_safetensors
from vitq.models import Stage
from vitq.models.weights import load_state_dict_file
from vitq.quantizers import UniformQuantizer

#: where ``ReconConfig.normalize`` starts every stage's loss (APHQ-ViT's released code: 2)
NORMALIZED_START = 2.0
#: the checkpoint in ``checkpoint_dir``: the model state, with the progress in its metadata (one atomic file)
CHECKPOINT_FILE = "reconstruction.safetensors"


@dataclass(frozen=True)
class StageRecon:
    """What reconstructing one stage did: its loss (``ReconConfig.loss``) on all calibration images before and after
    (hard rounding)."""

    stage: str
    learned_roundings: int
    learned_steps: int
    loss_before: float
    loss_after: float


def _is_row_uniform(quantizer) -> bool:
    return (isinstance(quantizer, UniformQuantizer) and quantizer.granularity == "channel" and quantizer.axis == 0)


def _wrap(qmodel, stage: Stage, settings: ReconConfig, generator: torch.Generator) -> list[tuple[object, nn.Module]]:
    """Swap every enabled quantizer of ``stage`` for its learnable stand-in; returns ``(slot, stand-in)`` pairs."""
    swapped = []
    for slot in qmodel.slots():
        quantizer = slot.quantizer
        if quantizer is None or not quantizer.enabled or not stage.contains(slot.point):
            continue
        if slot.role == "weight" and settings.learn_rounding and _is_row_uniform(quantizer):
            stand_in = AdaRoundWeight(quantizer, slot.module.weight)
        elif slot.role != "weight" and settings.learn_steps and type(quantizer) is UniformQuantizer:
            stand_in = LearnedStep(quantizer, settings.drop_prob, generator, settings.scale_relative)
        else:
            stand_in = StraightThrough(quantizer)
        slot.quantizer = stand_in
        swapped.append((slot, stand_in))
    return swapped


@torch.no_grad()
def full_loss(stage: Stage, x: torch.Tensor, target: torch.Tensor, batch_size: int) -> float:
    """The stage's squared error (loss ``mse``) over all of ``x`` (evaluated ``batch_size`` images at a time)."""
    return float(squared_error(run_batched(stage.run, x, batch_size), target))


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The model's own parameters without gradients (only the stand-ins' learn), restored afterwards."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def reconstruct_stage(qmodel, stage: Stage, x: torch.Tensor, target: torch.Tensor, settings: ReconConfig,
                      *, x_float: torch.Tensor | None = None, tail: Sequence[Stage] = (), seed: int = 0,
                      index: int = 0, progress: bool = True) -> StageRecon:
    """Reconstruct one stage of ``qmodel`` (calibrated) from its quantized input ``x`` to the float output
    ``target``; ``x_float``: the float model's input of the stage (needed by ``settings.drop_input``); ``tail``:
    the stages after it, which every loss but ``mse`` runs in float; ``(seed, index)`` seed its random stream.
    The learned values are written back into the model; the record's losses are ``settings.loss``."""
    if settings.drop_input and x_float is None:
        raise VitqError("drop_input needs the stage's float input (x_float)")
    generator = torch.Generator().manual_seed((seed * 100_003 + index) % 2**64)
    with _frozen(qmodel.model):
        # prepared on the stage as calibrated, before the stand-ins change anything
        loss_fn = prepare_loss(settings, StageProblem(stage, x, target, FloatTail(qmodel, tuple(tail)),
                                                      settings.batch_size), generator)
        loss_before = loss_fn.full()
        # normalize: the loss starts at NORMALIZED_START (a stage that is already exact keeps its scale)
        loss_scale = NORMALIZED_START / loss_before if settings.normalize and loss_before > 0 else 1.0
        roundings, steps = _learn(qmodel, stage, x, x_float if settings.drop_input else None, settings, loss_fn,
                                  loss_scale, generator, progress)
        loss_after = loss_fn.full()
    return StageRecon(stage.name, sum(m.alpha.numel() for m in roundings), len(steps), loss_before, loss_after)


def _learn(qmodel, stage: Stage, x: torch.Tensor, x_float: torch.Tensor | None, settings: ReconConfig,
           loss_fn: StageLoss, loss_scale: float, generator: torch.Generator,
           progress: bool) -> tuple[list[AdaRoundWeight], list[LearnedStep]]:
    """The optimisation of :func:`reconstruct_stage`: swap in the stand-ins, fit them, write back what they learned;
    returns the rounding and step stand-ins. With ``x_float``, each input element of a step is the float one with
    probability ``drop_prob`` (QDrop on the stage input); the loss is multiplied by ``loss_scale`` before the
    rounding regulariser is added."""
    swapped = _wrap(qmodel, stage, settings, generator)
    roundings = [m for _, m in swapped if isinstance(m, AdaRoundWeight)]
    steps = [m for _, m in swapped if isinstance(m, LearnedStep)]
    # the rounding variables keep their rate; the steps' follows settings.scale_schedule
    constant, cosine = (lambda _: 1.0), (lambda i: 0.5 * (1 + math.cos(math.pi * i / settings.iterations)))
    groups = [({"params": [m.alpha for m in roundings], "lr": settings.weight_lr}, constant),
              ({"params": [m.offset for m in steps], "lr": settings.scale_lr},
               cosine if settings.scale_schedule == "cosine" else constant)]
    groups = [(g, rate) for g, rate in groups if g["params"]]
    try:
        if groups:
            optimizer = torch.optim.Adam([g for g, _ in groups])
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, [rate for _, rate in groups])
            for m in steps:
                m.train()
            bar = tqdm(range(settings.iterations), desc=f"reconstructing {stage.name}", unit="it", leave=False,
                       disable=not progress)
            for iteration in bar:
                # drawn on the CPU generator: the same seed picks the same images on every device
                batch = torch.randint(len(x), (min(settings.batch_size, len(x)),), generator=generator).to(x.device)
                inputs = x[batch]
                if x_float is not None:
                    keep_float = (torch.rand(inputs.shape, generator=generator) < settings.drop_prob).to(x.device)
                    inputs = torch.where(keep_float, x_float[batch], inputs)
                with torch.enable_grad():
                    loss = loss_fn(stage.run(inputs), batch) * loss_scale
                    beta = settings.beta_at(iteration)
                    if beta is not None and roundings:
                        loss = loss + settings.round_weight * sum(m.regularizer(beta) for m in roundings)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                schedule.step()
            for m in steps:
                m.eval()
    finally:
        for slot, stand_in in swapped:
            stand_in.commit(slot.module)
            slot.quantizer = stand_in.quantizer
    return roundings, steps


#: augmentation: side of the random square crop, as a fraction of the image side
CROP_RANGE = (0.5, 1.0)


def augmented(images: torch.Tensor, copies: int, seed: int) -> torch.Tensor:
    """``images`` followed by ``copies`` randomly cropped-and-resized, randomly flipped versions of each
    (preprocessed ``[N, C, H, W]`` tensors, so a crop is resized back to ``H x W`` bilinearly)."""
    if copies == 0:
        return images
    generator = torch.Generator().manual_seed(seed)
    height, width = images.shape[-2:]
    out = [images]
    for _ in range(copies):
        for image in images:
            side = torch.empty(1).uniform_(*CROP_RANGE, generator=generator).item()
            h, w = max(1, round(side * height)), max(1, round(side * width))
            top = int(torch.randint(height - h + 1, (1,), generator=generator))
            left = int(torch.randint(width - w + 1, (1,), generator=generator))
            crop = image[None, :, top:top + h, left:left + w]
            crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            if torch.rand(1, generator=generator).item() < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
    return torch.cat(out)


#: layer ``j`` of stage ``i`` draws its mini-batches from seed index ``i * LAYER_SEED_STRIDE + j``
LAYER_SEED_STRIDE = 1000


@torch.no_grad()
def _layer_tensors(stage: Stage, x: torch.Tensor, layers: list[nn.Module], batch_size: int, *,
                   output: bool) -> list[torch.Tensor]:
    """What each of ``layers`` receives (its input, before its own input quantizer) or returns when ``stage`` runs
    on ``x`` (one pass for all of them)."""
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(lambda _, args, out, found=found: found.append(out if output else args[0]))
             for layer, found in zip(layers, seen, strict=True)]
    try:
        run_batched(stage.run, x, batch_size)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(found) for found in seen]


def reconstruct_layers(qmodel, stage: Stage, x: torch.Tensor, x_float: torch.Tensor, settings: ReconConfig,
                       *, seed: int = 0, index: int = 0, progress: bool = True) -> list[StageRecon]:
    """AdaRound's unit: reconstruct the weight layers of ``stage`` one at a time, in module order, each from its
    input in the quantized stage (input ``x``, earlier layers already reconstructed) to its float output (float
    stage input ``x_float``, float weights: all targets are taken before anything changes)."""
    layers = weight_layers(qmodel, stage)
    with qmodel.quantization_disabled():
        targets = _layer_tensors(stage, x_float, [layer for _, layer in layers], settings.batch_size, output=True)
    records = []
    for offset, ((name, layer), target) in enumerate(zip(layers, targets, strict=True)):
        # one pass per layer: the layers before it have just been reconstructed
        inputs, = _layer_tensors(stage, x, [layer], settings.batch_size, output=False)
        records.append(reconstruct_stage(qmodel, Stage(name, (name,), layer), inputs, target, settings, seed=seed,
                                         index=index * LAYER_SEED_STRIDE + offset, progress=progress))
    return records


def _fingerprint(settings: ReconConfig, seed: int, n_images: int) -> str:
    return json.dumps({"settings": settings.model_dump(mode="json"), "seed": seed, "images": n_images},
                      sort_keys=True)


def _save_checkpoint(qmodel, path: Path, done: int, fingerprint: str) -> None:
    # atomic: a checkpoint is either the old one or the new one
    write_safetensors(path, {k: v.detach().to("cpu").contiguous() for k, v in qmodel.model.state_dict().items()},
                      {"done": str(done), "fingerprint": fingerprint})


def _checkpoint_progress(path: Path, fingerprint: str, n_stages: int) -> int:
    """The index of the last stage finished in the checkpoint at ``path`` (which must match ``fingerprint``)."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise VitqError(f"reconstruction checkpoint {path} is unreadable ({err}); remove it to start over") from None
    if metadata.get("fingerprint") != fingerprint:
        raise VitqError(f"{path} holds a reconstruction with other settings or images; remove it or use another "
                        "checkpoint directory")
    done = metadata.get("done", "")
    if not (done.isascii() and done.isdigit() and int(done) < n_stages):
        raise VitqError(f"reconstruction checkpoint {path} has a broken progress entry {done!r} "
                        f"(the model has {n_stages} stages); remove it to start over")
    return int(done)


def reconstruct_model(qmodel, images: torch.Tensor, settings: ReconConfig, *, seed: int = 0,
                      checkpoint_dir: str | Path | None = None, progress: bool = True) -> list[StageRecon]:
    """Reconstruct every stage of a calibrated ``qmodel`` in forward order on ``images`` (see the module
    docstring). With ``checkpoint_dir``: save after every stage, and resume from it when it holds a run with
    the same settings, seed and image count (a different one is an error, so nothing is silently mixed)."""
    fingerprint = _fingerprint(settings, seed, len(images))
    images = augmented(images, settings.augment, seed)
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    stages = qmodel.stages()
    x_float = images
    done = -1
    if checkpoint is not None and checkpoint.is_file():
        # the float stream through the finished stages needs their weights from *before* reconstruction (AdaRound
        # changed them), i.e. the ones this model still has until the checkpoint is loaded
        done = _checkpoint_progress(checkpoint, fingerprint, len(stages))
        with torch.no_grad(), qmodel.quantization_disabled():
            for stage in stages[:done + 1]:
                x_float = run_batched(stage.run, x_float, settings.batch_size)
        # finite tensors, exactly the model's keys and shapes
        load_state_dict_file(qmodel.model, checkpoint, what="this reconstruction (remove the checkpoint to start over)")
    records: list[StageRecon] = []
    x = images
    bar = tqdm(stages, desc="reconstruction", unit="stage", disable=not progress)
    for index, stage in enumerate(bar):
        if index > done:
            with torch.no_grad(), qmodel.quantization_disabled():
                target = run_batched(stage.run, x_float, settings.batch_size)
            if settings.unit == "layer":
                records += reconstruct_layers(qmodel, stage, x, x_float, settings, seed=seed, index=index,
                                              progress=progress)
            else:
                records.append(reconstruct_stage(qmodel, stage, x, target, settings, x_float=x_float,
                                                 tail=stages[index + 1:],
                                                 seed=seed, index=index, progress=progress))
            if checkpoint is not None:
                _save_checkpoint(qmodel, checkpoint, index, fingerprint)
            x_float = target
            if records:
                last = records[-1]
                bar.set_postfix_str(f"{last.stage}: loss {last.loss_before:.3g} -> {last.loss_after:.3g}")
        with torch.no_grad():
            x = run_batched(stage.run, x, settings.batch_size)
    return records
