"""Decoded images in memory: :func:`load_tensors` for a selection, :class:`ImageCache` to decode each image once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from vitq.data.folders import ImageNetImages
from vitq.data.split import Split, seeded_split
from vitq.data.transforms import transform_for_model
from vitq.errors import VitqError

LOAD_BATCH_SIZE = 32


def load_tensors(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    progress: bool = True,
    desc: str = "loading images",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the selected images (all when ``indices`` is None) into ``[N,3,H,W]`` floats and ``[N]`` labels.

    The dataset's transform must yield equally sized tensors (see :func:`transform_for_model`).
    Holding the images in memory lets calibration and evaluation reuse them without re-decoding.
    """
    subset = Subset(dataset, list(range(len(dataset))) if indices is None else list(indices))
    if len(subset) == 0:
        raise VitqError("no images selected to load")
    loader = DataLoader(subset, batch_size=LOAD_BATCH_SIZE, shuffle=False, num_workers=num_workers)
    images, labels = [], []
    with tqdm(total=len(subset), desc=desc, unit="img", disable=not progress) as bar:
        for batch_images, batch_labels in loader:
            images.append(batch_images)
            labels.append(batch_labels)
            bar.update(len(batch_labels))
    return torch.cat(images).float(), torch.cat(labels).to(torch.int64)


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
        """The seeded split of this folder (:func:`~vitq.data.split.seeded_split`)."""
        return seeded_split(len(self.dataset), calib_size, seed, limit, source=str(self.dataset.root))

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
