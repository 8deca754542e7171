"""How images are read: ``torch.utils.data.DataLoader`` worker processes decode and transform in parallel."""

from __future__ import annotations

import os

#: at most this many loader processes by default (more rarely helps a ViT's evaluation)
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Loader worker processes when the user gives none: one per CPU core this process may use but one (kept for
    the model), at most :data:`MAX_DEFAULT_WORKERS`; 0 (decode in the main process) on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(MAX_DEFAULT_WORKERS, cores - 1))
