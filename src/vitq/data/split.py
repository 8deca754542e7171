"""The seeded calibration / evaluation split: disjoint index lists over one image folder.

Calibration and evaluation images are drawn from the same folder by a seeded permutation, so they never
overlap and a run can be reproduced from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitq.errors import VitqError


@dataclass(frozen=True)
class Split:
    """Dataset indices of the calibration and (possibly limited) evaluation images of one seed."""

    seed: int
    calib: list[int]
    eval: list[int]


def split_calib_eval(
    n_images: int, calib_size: int, seed: int, source: str = "the dataset"
) -> tuple[list[int], list[int]]:
    """Disjoint calibration / evaluation index lists over ``range(n_images)``, reproducible from ``seed``.

    A seeded ``torch.randperm`` is drawn; its first ``calib_size`` entries are the calibration set and
    the rest the evaluation set, each returned sorted ascending. At least one image must remain for
    evaluation. ``source`` names the image folder in error messages.
    """
    if calib_size < 0:
        raise VitqError(f"calibration size {calib_size} must not be negative")
    if calib_size > n_images:
        raise VitqError(f"calibration size {calib_size} is larger than the {n_images} images in {source}")
    if calib_size == n_images:
        raise VitqError(
            f"calibration size {calib_size} uses all {n_images} images in {source}, "
            "leaving none for evaluation"
        )
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(n_images, generator=generator).tolist()
    return sorted(permutation[:calib_size]), sorted(permutation[calib_size:])


def seeded_split(n_images: int, calib_size: int, seed: int, limit: int | None = None,
                 source: str = "the dataset") -> Split:
    """The :class:`Split` of ``seed``: :func:`split_calib_eval`, the evaluation list cut to its first ``limit``."""
    calib, evaluation = split_calib_eval(n_images, calib_size, seed, source=source)
    return Split(seed, calib, evaluation[:limit])
