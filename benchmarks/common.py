"""Shared set-up of the benchmark scripts: the real DeiT-tiny and its seeded calibration/evaluation split."""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

import vitq
from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE, assets_dir
from vitq.calib import ImageNetImages, load_tensors, split_calib_eval, transform_for_model
from vitq.report.runinfo import machine_summary

T = TypeVar("T")


def deit_tiny_split(calib_size: int, seed: int, n_eval: int) -> tuple[nn.Module, torch.Tensor, tuple]:
    """The float DeiT-tiny, its calibration images, and the first ``n_eval`` (images, labels) of the
    evaluation split drawn with ``seed`` (the same split as ``vitq eval --calib-size --seed``)."""
    assets = assets_dir()
    model = vitq.create_model("deit_tiny_patch16_224", checkpoint=assets / DEIT_TINY_CHECKPOINT)
    dataset = ImageNetImages(assets / IMAGENET_SAMPLE, transform_for_model(model))
    calib_idx, eval_idx = split_calib_eval(len(dataset), calib_size, seed)
    calib, _ = load_tensors(dataset, calib_idx, progress=False)
    return model, calib, load_tensors(dataset, eval_idx[:n_eval], progress=False)


def comma_list(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    """An argparse ``type`` for comma-separated values: ``comma_list(int)("0,50")`` is ``[0, 50]``."""
    return lambda text: [kind(part) for part in text.split(",")]


def report_header(title: str, *details: str) -> list[str]:
    """The first lines of a result file: title, date, the exact command, then ``details`` (markdown bullets)
    and the machine, so anyone can rerun it."""
    return [f"# {title}", "", f"- date: {datetime.date.today().isoformat()}",
            f"- command: `python {shlex.join(sys.argv)}`", *details,
            f"- machine: {machine_summary()} ({torch.get_num_threads()} threads)", ""]


def write_report(path: Path, lines: list[str]) -> None:
    """Write the markdown ``lines`` to ``path`` (creating its folder) and print them."""
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
