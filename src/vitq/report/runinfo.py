"""Provenance of a run: the machine, the peak memory of the process, checkpoint fingerprints."""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import sys
from pathlib import Path

import torch


def machine_summary() -> str:
    """Platform, CPU count and torch version, e.g. ``Linux-6.1-x86_64, 2 CPUs, torch 2.4.1``."""
    return f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def sha256_prefix(path: str | Path, length: int = 12) -> str:
    """The first ``length`` hex digits of the sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
