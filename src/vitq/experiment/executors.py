"""Where the cells of a ``vitq compare`` grid run: in this process (:class:`LocalExecutor`, the default) or as Ray
tasks (:class:`RayExecutor`, ``--executor ray``).

A cell is the unit of work: load the float model and the images, quantize one configuration on its split's
calibration images and evaluate it on the split's evaluation images (:func:`run_cell`). It is described by
picklable values only (:class:`CellContext` + :class:`Cell`: the :class:`~vitq.experiment.runs.RunSpec`, the
validated config and the split's indices), so a Ray worker rebuilds the model and decodes the images itself; no
tensor is shipped. Everything else, the plan, the journal and the report, stays in the driver
(:func:`vitq.experiment.compare.run_compare`).

A cell returns its own numbers (:class:`CellResult`) or its one-line error (:class:`CellFailure`): a failing cell
never stops the grid. The seed's float top-1 that a report row needs is filled in by the driver.

Ray is an optional dependency (``pip install "vitq[ray]"``), imported only by :class:`RayExecutor`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from types import ModuleType, TracebackType
from typing import Any, Literal

import torch
from torch import nn

from vitq.config import QuantConfig
from vitq.data import ImageCache, Split
from vitq.errors import VitqError
from vitq.eval.size import model_size
from vitq.experiment.grammar import FLOAT
from vitq.experiment.runs import MB, RunSpec, evaluate_on_split, quantize_on_split

EXECUTORS = ("local", "ray")
RAY_MISSING = '--executor ray needs Ray: pip install "vitq[ray]"'


@dataclass(frozen=True)
class ExecutorSpec:
    """How the cells run: ``kind`` ``local`` (this process, one cell after the other) or ``ray`` (one Ray task
    per cell, on the cluster at ``ray_address``, e.g. ``auto`` or ``ray://host:10001``, or on a Ray started on
    this machine for the run when ``None``); ``cpus_per_task`` is what a CPU cell asks Ray for (a CUDA cell asks
    for one GPU)."""

    kind: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    cpus_per_task: int = 1

    def check(self) -> None:
        """Refuse a bad combination, and a missing Ray, before any model or image is loaded."""
        if self.kind not in EXECUTORS:
            raise VitqError(f"unknown executor {self.kind!r}; known: {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.kind != "ray":
            raise VitqError("--ray-address needs --executor ray")
        if self.cpus_per_task < 1:
            raise VitqError(f"cpus_per_task must be a positive integer, got {self.cpus_per_task!r}")
        if self.kind == "ray":
            import_ray()


def import_ray() -> ModuleType:
    """The ``ray`` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise VitqError(RAY_MISSING) from None
    return ray


@dataclass(frozen=True)
class Cell:
    """One (variant, bits, seed) of the grid: its journal ``key``, report ``label``, validated ``config`` and the
    seed's ``split`` (image indices only)."""

    key: str
    label: str
    config: QuantConfig
    split: Split

    @property
    def setting(self) -> str:
        """The report's bit setting: ``W8A8``, ... or ``float``."""
        return FLOAT if self.config.method == FLOAT else f"W{self.config.w_bits}A{self.config.a_bits}"

    @property
    def is_float(self) -> bool:
        return self.config.method == FLOAT


@dataclass(frozen=True)
class CellContext:
    """What every cell of a grid shares: the run spec (model, checkpoint, data, evaluation settings) and the
    driver's ``torch`` intra-op thread count, which a worker process sets too so that its numbers are the
    driver's to the bit."""

    spec: RunSpec
    threads: int


@dataclass(frozen=True)
class CellResult:
    """The numbers of a finished cell: its own top-1 / top-5 (percent), the seconds it took and its size; the
    progress ``summary`` line of its evaluation."""

    n_images: int
    top1: float
    top5: float
    calib_seconds: float
    eval_seconds: float
    size_mb: float
    summary: str


@dataclass(frozen=True)
class CellFailure:
    """A cell that raised: the error as one line, and whether it was a bug (``internal``: any exception other
    than a :class:`~vitq.errors.VitqError` or ``OSError``, or a lost worker) rather than a problem with the
    input."""

    error: str
    internal: bool


CellOutcome = CellResult | CellFailure


def one_line(err: BaseException) -> str:
    """An exception as one line; ``Type: message`` for a bug (its type is part of what to report)."""
    text = " ".join(str(err).split())
    return text if isinstance(err, VitqError | OSError) else f"{type(err).__name__}: {text}"


class Workbench:
    """The float model and the image cache of one :class:`RunSpec` in one process: each image is decoded once
    however many cells use it. ``model`` and ``cache`` may be given (the driver's own), else they are built."""

    def __init__(self, spec: RunSpec, model: nn.Module | None = None, cache: ImageCache | None = None) -> None:
        self.spec = spec
        self.model = spec.float_model() if model is None else model
        self.cache = spec.image_cache(self.model) if cache is None else cache

    def run(self, cell: Cell) -> CellOutcome:
        """The cell's numbers, or its error (a failing cell must not stop the grid; Ctrl-C still does)."""
        try:
            return run_cell(self.model, self.spec, cell, self.cache)
        except Exception as err:
            return CellFailure(one_line(err), internal=not isinstance(err, VitqError | OSError))


def run_cell(model: nn.Module, spec: RunSpec, cell: Cell, cache: ImageCache) -> CellResult:
    """Quantize (a copy of) ``model`` with the cell's config on its calibration images and evaluate it."""
    qmodel, calib_seconds = quantize_on_split(model, spec.model, cell.config, cache, cell.split,
                                              progress=spec.progress, inplace=False)
    result = evaluate_on_split(qmodel, cache, cell.split, spec)
    return CellResult(n_images=result.n_images, top1=result.top1, top5=result.top5, calib_seconds=calib_seconds,
                      eval_seconds=result.seconds, size_mb=model_size(qmodel).quantized_bytes / MB,
                      summary=result.summary())


class Executor(ABC):
    """Runs cells and yields each one with its outcome as it finishes (completion order: the driver puts the
    report in plan order). A context manager: leaving it releases what it started."""

    @abstractmethod
    def run(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellOutcome]]:
        """Every cell of ``cells`` exactly once, with its outcome, as soon as it is known."""

    @abstractmethod
    def close(self) -> None:
        """Release workers, connections or a cluster started for this executor."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class LocalExecutor(Executor):
    """Every cell in this process, one after the other in the given order, on the driver's own model and images."""

    def __init__(self, bench: Workbench) -> None:
        self.bench = bench

    def run(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellOutcome]]:
        if not cells:
            return
        # decode every image the cells need at once, with one progress bar, when they fit the cache budget
        self.bench.cache.preload(sorted({i for c in cells for i in c.split.calib + c.split.eval}))
        for cell in cells:
            yield cell, self.bench.run(cell)

    def close(self) -> None:
        """Nothing to release: the model and images are the driver's."""


# A Ray worker process runs many cells of the same grid: it keeps the last spec's model and decoded images.
_WORKER_BENCH: dict[RunSpec, Workbench] = {}


def _worker_cell(context: CellContext, cell: Cell) -> CellOutcome:
    """The body of a Ray task: rebuild (or reuse) the model and images of ``context.spec`` in this process and run
    one cell with the driver's thread count."""
    torch.set_num_threads(context.threads)
    # Progress bars of several worker processes would only interleave; they are not part of any number.
    spec = replace(context.spec, progress=False)
    if spec.device.startswith("cuda"):
        # Ray shows a task only the GPU it was given (CUDA_VISIBLE_DEVICES), which is device 0 in the task.
        spec = replace(spec, device="cuda:0")
    bench = _WORKER_BENCH.get(spec)
    if bench is None:
        try:
            bench = Workbench(spec)
        except Exception as err:
            return CellFailure(one_line(err), internal=not isinstance(err, VitqError | OSError))
        _WORKER_BENCH.clear()
        _WORKER_BENCH[spec] = bench
    return bench.run(cell)


class RayExecutor(Executor):
    """One Ray task per cell: one GPU each when the run's device is CUDA, else ``cpus_per_task`` CPU cores.

    Connects to the cluster at ``address`` (passed to ``ray.init(address=...)``), or reuses the Ray this process
    already initialized, or starts a local Ray for this executor (quiet: no dashboard, no worker logs on the
    driver's terminal) and shuts it down on :meth:`close`."""

    def __init__(self, context: CellContext, *, address: str | None = None, cpus_per_task: int = 1) -> None:
        self.ray = import_ray()
        self.context = context
        self.owned = False
        if address is not None:
            self.ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            self.owned = True  # our connection: disconnect on close (the cluster stays up)
        elif not self.ray.is_initialized():
            self.ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            self.owned = True
        resources: dict[str, Any] = {"num_cpus": cpus_per_task}
        if context.spec.device.startswith("cuda"):
            resources["num_gpus"] = 1
        # max_retries=0: a cell that fails is reported once, not run again behind the driver's back
        self.task = self.ray.remote(_worker_cell).options(max_retries=0, **resources)
        self.context_ref = self.ray.put(context)
        self.pending: dict[Any, Cell] = {}

    def run(self, cells: Sequence[Cell]) -> Iterator[tuple[Cell, CellOutcome]]:
        # submitted in plan order (each seed's float run first), so the float top-1 a row needs comes early
        self.pending = {self.task.remote(self.context_ref, cell): cell for cell in cells}
        while self.pending:
            (ready,), _ = self.ray.wait(list(self.pending), num_returns=1)
            cell = self.pending.pop(ready)
            try:
                outcome: CellOutcome = self.ray.get(ready)
            except self.ray.exceptions.RayError as err:  # the worker died (out of memory, killed, lost node)
                first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                outcome = CellFailure(f"{type(err).__name__}: {first.strip()}", internal=True)
            yield cell, outcome

    def close(self) -> None:
        for ref in self.pending:  # interrupted: the cells not finished yet are not wanted any more
            self.ray.cancel(ref)
        self.pending = {}
        if self.owned:
            self.ray.shutdown()
            self.owned = False
