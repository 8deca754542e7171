"""Top-1 / top-5 accuracy with a 95 % confidence interval, and per-image correctness for paired
comparisons between methods evaluated on the same images."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from vitq.checks import check_images, check_labels, check_logits, expected_image_size
from vitq.data import load_tensors


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (in %) for a proportion: better than ±1.96·√(p(1−p)/n) near 0 or 1."""
    if n == 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent
    n_images: int
    seconds: float
    correct: torch.Tensor = field(repr=False)  # [n_images] bool, top-1 hit per image

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
def evaluate(model: nn.Module, data, *, batch_size: int = 64, progress: bool = True,
             desc: str = "evaluating") -> EvalResult:
    """Accuracy of ``model`` on ``data``: a ``(images, labels)`` tensor pair or a dataset.

    The images must be finite ``[N, 3, H, W]`` floats and the labels ``N`` class indices below the model's
    number of classes; logits with a NaN or infinity are an error, not a prediction."""
    images, labels = data if isinstance(data, tuple) and len(data) == 2 else load_tensors(data, progress=progress)
    images = check_images(images, "evaluation images", expected_image_size(model))
    labels = check_labels(labels, len(images), None)
    model.eval()
    hits1, hits5 = [], []
    start = time.perf_counter()
    for chunk, target in tqdm(zip(images.split(batch_size), labels.split(batch_size), strict=True),
                              total=math.ceil(len(images) / batch_size), desc=desc, unit="batch",
                              disable=not progress):
        logits = model(chunk)
        check_logits(logits, "the evaluated model")
        check_labels(target, len(chunk), logits.shape[-1])
        top5 = logits.topk(min(5, logits.shape[-1]), dim=1).indices
        hits1.append(top5[:, 0] == target)
        hits5.append((top5 == target[:, None]).any(dim=1))
    seconds = time.perf_counter() - start
    correct = torch.cat(hits1)
    n = len(correct)
    return EvalResult(top1=100 * correct.float().mean().item(),
                      top5=100 * torch.cat(hits5).float().mean().item(),
                      n_images=n, seconds=seconds, correct=correct)
