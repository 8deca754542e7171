"""Shared set-up of the benchmark scripts: the real DeiT-tiny and its seeded calibration/evaluation split."""

from __future__ import annotations

import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from vitq.experiment import RunSpec
from vitq.files import write_text
from vitq.report.runinfo import machine_summary

T = TypeVar("T")


def deit_tiny_split(calib_size: int, seed: int, n_eval: int) -> tuple[nn.Module, torch.Tensor, tuple]:
    """The float DeiT-tiny, its calibration images, and the first ``n_eval`` (images, labels) of the
    evaluation split drawn with ``seed`` (the same split as ``vitq eval --calib-size --seed``)."""
    spec = RunSpec.resolve(progress=False)
    model = spec.float_model()
    cache = spec.image_cache(model)
    split = cache.split(calib_size, seed, n_eval)
    return model, cache.tensors(split.calib)[0], cache.tensors(split.eval)


@torch.no_grad()
def agreement_with_float(model: nn.Module, qmodel: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """(mean KL(float ‖ quantized) of the class distribution, top-1 agreement with float %) on ``images``."""
    ref, out = model(images).log_softmax(-1), qmodel(images).log_softmax(-1)
    kl = F.kl_div(out, ref, log_target=True, reduction="batchmean")
    agree = (ref.argmax(-1) == out.argmax(-1)).double().mean() * 100
    return float(kl), float(agree)


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median wall time of ``repeats`` calls of ``run``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    """Write the markdown ``lines`` to ``path`` (creating its folder, atomically) and print them."""
    text = "\n".join(lines)
    write_text(path, text)
    print(text)


def journal_records(path: Path) -> list[dict]:
    """The records of a benchmark's JSON-lines journal (none when it does not exist yet)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_journal(path: Path, record: dict) -> None:
    """Append ``record`` to the journal at ``path`` as one JSON line, so an interrupted run resumes after it."""
    with path.open("a") as journal:
        journal.write(json.dumps(record) + "\n")
