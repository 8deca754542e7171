"""Top-1 / top-5 accuracy with a 95 % confidence interval, and per-image correctness for paired
comparisons between methods evaluated on the same images.

The core is :func:`evaluate_indices`: the per-image hits (:class:`ImageHits`) of a model on a list of dataset
indices, streamed batch by batch. :func:`evaluate` builds an :class:`EvalResult` on it (or on an in-memory
``(images, labels)`` pair, through the same per-batch code)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vitq.checks import check_images, check_labels, check_logits, expected_image_size
from vitq.data.loader import image_loader
from vitq.device import model_device
from vitq.errors import VitqError


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (in %) for a proportion: better than ±1.96·√(p(1−p)/n) near 0 or 1."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass(frozen=True)
class ImageHits:
    """Per-image results of an evaluation, in the order of the images evaluated: ``top1`` and ``top5`` are
    ``[N]`` bool tensors on the CPU (a hit: the label is the top-1 / among the top-5 predictions).

    Only these are kept, never logits, so the memory of an evaluation does not grow with its logits. Results of
    shards concatenate (:meth:`cat`) or, scattered into full-length tensors, sum across processes."""

    top1: torch.Tensor
    top5: torch.Tensor

    def __len__(self) -> int:
        return len(self.top1)

    @classmethod
    def cat(cls, parts: Sequence[ImageHits]) -> ImageHits:
        return cls(torch.cat([p.top1 for p in parts]), torch.cat([p.top5 for p in parts]))


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    n_images: int
    seconds: float
    correct: torch.Tensor = field(repr=False)  # [n_images] bool, top-1 hit per image
    correct5: torch.Tensor | None = field(default=None, repr=False)  # [n_images] bool, top-5 hit per image

    @classmethod
    def from_hits(cls, hits: ImageHits, seconds: float) -> EvalResult:
        """Top-1/top-5 in percent of the per-image ``hits``."""
        if len(hits) == 0:
            raise VitqError("no images to evaluate")
        return cls(top1=100 * hits.top1.float().mean().item(), top5=100 * hits.top5.float().mean().item(),
                   n_images=len(hits), seconds=seconds, correct=hits.top1, correct5=hits.top5)

    @property
    def top1_ci95(self) -> tuple[float, float]:
        return wilson_interval(int(self.correct.sum()), self.n_images)

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        lo, hi = self.top1_ci95
        return (f"top-1 {self.top1:.2f} % (95 % CI {lo:.1f}-{hi:.1f}), top-5 {self.top5:.2f} % "
                f"on {self.n_images} images, {self.images_per_s:.1f} images/s")


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_images: int, *,
                     progress: bool = True, desc: str = "evaluating") -> ImageHits:
    """Per-image hits of ``model`` on ``batches`` of ``(images, labels)`` (``n_images`` in all, for the progress
    bar), each moved to the model's device (:func:`~vitq.device.model_device`).

    Every batch is checked: finite ``[B, 3, H, W]`` float images of the model's size, integer labels below its
    number of classes, finite logits (a NaN or infinity is an error, not a prediction)."""
    model.eval()
    device = model_device(model)
    size = expected_image_size(model)
    hits1, hits5 = [], []
    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress) as bar:
        for images, labels in batches:
            images = check_images(images, "evaluation images", size).to(device, non_blocking=True)
            labels = check_labels(labels, len(images), None).to(device, non_blocking=True)
            logits = model(images)
            check_logits(logits, "the evaluated model")
            check_labels(labels, len(images), logits.shape[-1])
            top5 = logits.topk(min(5, logits.shape[-1]), dim=1).indices
            hits1.append((top5[:, 0] == labels).cpu())
            hits5.append((top5 == labels[:, None]).any(dim=1).cpu())
            bar.update(len(labels))
    if not hits1:
        return ImageHits(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    return ImageHits(torch.cat(hits1), torch.cat(hits5))


def evaluate_indices(model: nn.Module, dataset: Dataset, indices: Sequence[int], *, batch_size: int = 64,
                     workers: int = 0, progress: bool = True, desc: str = "evaluating") -> ImageHits:
    """Per-image hits of ``model`` on ``dataset[i]`` for ``i`` in ``indices``, in that order, streamed.

    The images are decoded by ``workers`` loader processes (0: in this process) in batches of ``batch_size``
    (:func:`~vitq.data.loader.image_loader`, page-locked when the model is on a CUDA device) and only the
    per-image hits are kept, so memory does not grow with the number of images. The evaluation of a shard of
    ``indices`` gives exactly the matching slice of the evaluation of all of them: a distributed evaluation
    evaluates one shard per process and gathers (or sums, scattered into full-length tensors) the hits."""
    indices = list(indices)
    loader = image_loader(dataset, indices, batch_size=batch_size, workers=workers,
                          pin_memory=model_device(model).type == "cuda")
    return evaluate_batches(model, loader, len(indices), progress=progress, desc=desc)


def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor] | Dataset, *, batch_size: int = 64,
             progress: bool = True, desc: str = "evaluating", indices: Sequence[int] | None = None,
             workers: int = 0) -> EvalResult:
    """Accuracy of ``model`` on ``data``: a ``(images, labels)`` tensor pair, or a dataset of ``(image, label)``
    streamed by :func:`evaluate_indices` (its ``indices``, default all, with ``workers`` loader processes).

    The images must be finite ``[N, 3, H, W]`` floats and the labels ``N`` class indices below the model's
    number of classes; logits with a NaN or infinity are an error, not a prediction. Both forms of the same
    images give the same result; ``seconds`` counts the decoding of streamed images."""
    start = time.perf_counter()
    if isinstance(data, tuple) and len(data) == 2:
        images = check_images(data[0], "evaluation images", expected_image_size(model))
        labels = check_labels(data[1], len(images), None)
        if indices is not None:
            images, labels = images[list(indices)], labels[list(indices)]
        batches = zip(images.split(batch_size), labels.split(batch_size), strict=True)
        hits = evaluate_batches(model, batches, len(images), progress=progress, desc=desc)
    else:
        hits = evaluate_indices(model, data, range(len(data)) if indices is None else indices,
                                batch_size=batch_size, workers=workers, progress=progress, desc=desc)
    return EvalResult.from_hits(hits, time.perf_counter() - start)
