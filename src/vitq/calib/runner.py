"""Block-sequential calibration runner.

Calibration runs stage by stage (embedding, each block, head): the calibration set's input to
stage i is held in memory, the method calibrates stage i on it, and the stage's *quantized*
output becomes the input of stage i+1. Peak memory is one stage's activations for the
calibration set, whatever the depth of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from vitq.models import Stage
from vitq.quantizers import Quantizer

StageVisitor = Callable[[Stage, torch.Tensor], None]


def run_batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` applied to ``x`` in chunks of ``batch_size`` along dim 0."""
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def run_stagewise(qmodel, images: torch.Tensor, visit: StageVisitor, *, batch_size: int = 32,
                  progress: bool = True, desc: str = "calibrating") -> None:
    """Call ``visit(stage, stage_input)`` for every stage, feeding quantized outputs on."""
    x = images
    for stage in tqdm(qmodel.stages(), desc=desc, unit="stage", disable=not progress):
        visit(stage, x)
        x = run_batched(stage.run, x, batch_size)


@torch.no_grad()
def run_stagewise_with_float(qmodel, images: torch.Tensor,
                             visit: Callable[[Stage, torch.Tensor, torch.Tensor], torch.Tensor], *,
                             batch_size: int = 32, progress: bool = True, desc: str = "calibrating") -> None:
    """:func:`run_stagewise` with a second stream: the calibration set through the *float* model.

    ``visit(stage, x, x_float)`` gets the stage's input in the quantized model and in the float model,
    calibrates the stage and returns the stage's float output (computed before it changes any weight,
    so that the float stream stays the original model's, as ERQ's stored float activations are).
    """
    x, x_float = images, images
    for stage in tqdm(qmodel.stages(), desc=desc, unit="stage", disable=not progress):
        x_float = visit(stage, x, x_float)
        x = run_batched(stage.run, x, batch_size)


@contextmanager
def calibrating(quantizers: Iterable[Quantizer]) -> Iterator[None]:
    """Make each quantizer calibrate on the next input it sees (then quantize it)."""
    quantizers = list(quantizers)
    for q in quantizers:
        q.calibrating = True
    try:
        yield
    finally:
        for q in quantizers:
            q.calibrating = False


def calibrate_in_forward_order(qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
    """RepQ-ViT's calibration order: each quantizer initialises on the whole calibration batch, in
    forward order, so it sees inputs already quantized upstream (docs/protocol.md#what-is-quantized)."""

    def visit(stage: Stage, x: torch.Tensor) -> None:
        with calibrating(qmodel.stage_quantizers(stage)):
            stage.run(x)

    run_stagewise(qmodel, images, visit, progress=progress)
