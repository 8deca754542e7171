"""Decoded images: :func:`load_tensors` for a selection held in memory, and :class:`ImageCache`, which decodes each
image of a folder once per process while the decoded images fit in a memory budget and streams them otherwise.

A decoded 224 px image is 0.6 MB of float32: the 50,000 ImageNet validation images would be 30 GB. Calibration
images (a few thousand at most) are held as one tensor because methods need them so; evaluation images stream
through a :class:`~torch.utils.data.DataLoader` (:func:`vitq.eval.accuracy.evaluate_indices`) unless the whole
selection fits in the cache's budget.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from vitq.data.folders import ImageNetImages
from vitq.data.loader import image_loader
from vitq.data.split import Split, seeded_split
from vitq.data.transforms import data_config_for_model, transform_for_model
from vitq.errors import VitqError

LOAD_BATCH_SIZE = 32
#: default memory budget of an :class:`ImageCache` (decoded images kept for reuse), in MiB
IMAGE_CACHE_MB = 2048
#: environment variable overriding :data:`IMAGE_CACHE_MB` (0: never cache, always stream)
IMAGE_CACHE_ENV = "VITQ_IMAGE_CACHE_MB"


def load_tensors(
    dataset: Dataset,
    indices: Sequence[int] | None = None,
    *,
    progress: bool = True,
    desc: str = "loading images",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the selected images (all when ``indices`` is None) into ``[N,3,H,W]`` floats and ``[N]`` labels,
    with ``num_workers`` loader processes.

    The dataset's transform must yield equally sized tensors (see :func:`transform_for_model`). Meant for
    calibration images and small selections: the result is held in memory whole.
    """
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise VitqError("no images selected to load")
    images, labels = [], []
    with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
        for batch_images, batch_labels in image_loader(dataset, indices, batch_size=LOAD_BATCH_SIZE,
                                                       workers=num_workers):
            images.append(batch_images)
            labels.append(batch_labels)
            bar.update(len(batch_labels))
    return torch.cat(images).float(), torch.cat(labels).to(torch.int64)


def image_cache_budget() -> int:
    """The cache budget in bytes: ``$VITQ_IMAGE_CACHE_MB`` MiB when set, else :data:`IMAGE_CACHE_MB`."""
    text = os.environ.get(IMAGE_CACHE_ENV)
    if text is None:
        return IMAGE_CACHE_MB * 2**20
    try:
        megabytes = int(text)
    except ValueError:
        megabytes = -1
    if megabytes < 0:
        raise VitqError(f"{IMAGE_CACHE_ENV}={text!r} must be a whole number of MiB, 0 or more")
    return megabytes * 2**20


class _CachedImages(Dataset):
    """A folder's images by index: the cached tensor when there is one, else decoded from the file."""

    def __init__(self, dataset: Dataset, images: dict[int, torch.Tensor], labels: dict[int, int]) -> None:
        self.dataset, self.images, self.labels = dataset, images, labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self.images:
            return self.images[index], self.labels[index]
        return self.dataset[index]


class ImageCache:
    """The images of one folder, preprocessed for one model, decoded by ``workers`` loader processes.

    Decoded images are kept by index while they fit in ``budget_bytes`` (default :func:`image_cache_budget`:
    2 GiB, about 3,500 images of 224 px), so a ``compare`` grid over an ImageNet sample preprocesses its
    images once for every method, bit setting and seed. A selection that does not fit is never cached: it is
    decoded again each time it is evaluated (:meth:`stream`), and memory stays bounded.
    """

    def __init__(self, root: Path, model: nn.Module, *, progress: bool, workers: int = 0,
                 labels: Path | None = None, budget_bytes: int | None = None) -> None:
        self.dataset = ImageNetImages(root, transform=transform_for_model(model), labels=labels)
        self.progress = progress
        self.workers = workers
        _, height, width = data_config_for_model(model)["input_size"]
        #: bytes of one decoded image (float32 ``[3, H, W]``)
        self.image_bytes = 3 * height * width * 4
        budget = image_cache_budget() if budget_bytes is None else budget_bytes
        #: how many decoded images the cache may hold
        self.capacity = budget // self.image_bytes
        self._images: dict[int, torch.Tensor] = {}
        self._labels: dict[int, int] = {}

    def split(self, calib_size: int, seed: int, limit: int | None = None) -> Split:
        """The seeded split of this folder (:func:`~vitq.data.split.seeded_split`)."""
        return seeded_split(len(self.dataset), calib_size, seed, limit, source=str(self.dataset.root))

    def file_names(self, indices: Sequence[int]) -> list[str]:
        return [self.dataset.samples[i][0].name for i in indices]

    def cached(self, indices: Sequence[int]) -> bool:
        """Whether every image of ``indices`` is decoded and kept."""
        return all(i in self._images for i in indices)

    def _decode(self, indices: Sequence[int], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_tensors(self.dataset, indices, progress=self.progress, desc=desc, num_workers=self.workers)

    def preload(self, indices: Sequence[int], desc: str = "loading images") -> bool:
        """Decode and keep the images of ``indices`` when they all fit in the budget (with those already kept);
        otherwise keep nothing and return False: they will stream."""
        missing = sorted(set(indices).difference(self._images))
        if len(self._images) + len(missing) > self.capacity:
            return False
        if missing:
            images, labels = self._decode(missing, desc)
            self._images.update(zip(missing, images, strict=True))
            self._labels.update(zip(missing, labels.tolist(), strict=True))
        return True

    def tensors(self, indices: Sequence[int], desc: str = "loading images") -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[N, 3, H, W]`` and labels ``[N]`` of ``indices`` held in memory (calibration images, small
        selections), decoding those not seen yet and keeping them while the budget allows."""
        if not indices:
            raise VitqError("no images selected to load")
        if not self.preload(indices, desc):  # over the budget: decoded for this call only
            return self._decode(indices, desc)
        return (torch.stack([self._images[i] for i in indices]),
                torch.tensor([self._labels[i] for i in indices], dtype=torch.int64))

    def stream(self, indices: Sequence[int]) -> tuple[Dataset, int]:
        """The dataset to stream ``indices`` from and the loader processes to use: the kept tensors in this
        process when they are all cached, else the folder decoded by :attr:`workers` processes."""
        if indices and self.cached(indices):
            return _CachedImages(self.dataset, self._images, self._labels), 0
        return self.dataset, self.workers
