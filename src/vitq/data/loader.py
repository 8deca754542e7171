"""How images are read: ``torch.utils.data.DataLoader`` worker processes decode and transform in parallel."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vitq.errors import VitqError

#: at most this many loader processes by default (more rarely helps a ViT's evaluation)
MAX_DEFAULT_WORKERS = 8
#: what torch's DataLoader puts in the message of an exception raised in a worker process
_WORKER_TRACEBACK = "Original Traceback"


def default_workers() -> int:
    """Loader worker processes when the user gives none: one per CPU core this process may use but one (kept for
    the model), at most :data:`MAX_DEFAULT_WORKERS`; 0 (decode in the main process) on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))


def image_loader(dataset: Dataset, indices: Sequence[int], *, batch_size: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(images, labels)`` of ``dataset[i]`` for ``i`` in ``indices``, in that order, from a
    :class:`~torch.utils.data.DataLoader`.

    ``workers`` processes decode ahead of the consumer (0: decode in this process); at most ``2 * workers``
    batches wait in memory, so memory stays bounded however many images there are. ``pin_memory``: page-locked
    batches, for asynchronous copies to a CUDA device. A :class:`VitqError` raised in a worker (a corrupt image)
    is raised here with its own one-line message."""
    if workers < 0:
        raise VitqError(f"image loader workers must be 0 or more, got {workers}")
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory)
    try:
        yield from loader
    except VitqError as err:
        # the DataLoader re-raises a worker's exception with the worker's traceback in its message
        text = str(err)
        if _WORKER_TRACEBACK not in text:
            raise
        raise VitqError(text.strip().splitlines()[-1].split(f"{VitqError.__name__}: ", 1)[-1]) from None
