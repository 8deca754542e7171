"""The comparison engine behind ``vitq compare``: methods (with their own options) x bit settings x seeds
against the float model, every run on the same images per seed, journaled so a long grid can resume.

    spec = RunSpec.resolve()
    outcome = run_compare(spec, CompareSpec(methods="minmax,percentile", bits="W8A8,W4A4", seeds="0,1",
                                            out_dir=Path("runs/compare")))

The plan and every configuration are validated before any model or image is loaded. The driver (this module)
owns the plan, the splits, the journal and the report; each (variant, bits, seed) cell is quantized and evaluated
by an executor (:mod:`vitq.experiment.executors`: in this process, or as Ray tasks). Each finished run is one
line of the journal ``runs.jsonl`` keyed by everything its numbers depend on (:func:`run_key`); with
``resume`` a run whose key is there is read back instead of run again. A failed cell is one journal line with its
error (run again by ``resume``), a section of the report and an entry of :attr:`CompareOutcome.failures`; the
other cells go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from vitq.config import QuantConfig, first_error, make
from vitq.data import ImageCache, Split
from vitq.errors import VitqError
from vitq.experiment.executors import (
    Cell,
    CellContext,
    CellFailure,
    CellResult,
    Executor,
    ExecutorSpec,
    LocalExecutor,
    RayExecutor,
    Workbench,
)
from vitq.experiment.grammar import (
    FLOAT,
    Variant,
    parse_bits,
    parse_list,
    parse_reference,
    parse_seed,
    parse_variants,
)
from vitq.experiment.runs import ConfigRequest, RunSpec
from vitq.files import check_folder_output, write_text
from vitq.methods import method_class, method_names
from vitq.report import CompareRun, FailedRun, machine_summary, sha256_prefix, write_compare_report
from vitq.report.leaderboard import write_leaderboard

JOURNAL_FILE = "runs.jsonl"
DEFAULT_METHODS, DEFAULT_BITS, DEFAULT_SEEDS = "minmax,percentile", "W8A8,W6A6,W4A4", "0,1,2"
PRESETS = ("leaderboard",)
LEADERBOARD_BITS = "W8A8,W6A6,W4A4,W3A3"
LEADERBOARD_DIR = Path("benchmarks/results/leaderboard")

Plan = list[tuple[Variant, list[tuple[int, int]]]]
Grid = dict[int, list[tuple[str, QuantConfig]]]


@dataclass(frozen=True)
class CompareSpec:
    """A comparison as the user describes it: ``methods`` (variants, e.g. ``dopq-vit[softmax=log2]``), ``bits``
    (``W8A8,W4A4``) and ``seeds`` (``0,1,2``) as comma lists, or ``preset``; the settings every run shares
    (``request``: calibration size, options, overrides, reconstruction); an optional paired ``reference`` label;
    the output folder, whether to resume its journal (or start it over an existing one: ``overwrite``), the
    command line for the report's provenance, and where the cells run (``executor``)."""

    methods: str | None = None
    bits: str | None = None
    seeds: str = DEFAULT_SEEDS
    preset: str | None = None
    reference: str | None = None
    request: ConfigRequest = field(default_factory=ConfigRequest)
    out_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    command: str = "vitq compare"
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)


@dataclass
class CompareOutcome:
    """The finished runs in plan order (per seed: float, then the grid), the paired reference label, the files
    written, and the cells that failed (``internal``: a bug rather than a problem with the input)."""

    runs: list[CompareRun]
    reference: str | None
    paths: dict[str, Path]
    failures: list[FailedRun] = field(default_factory=list)


def compare_plan(spec: CompareSpec) -> tuple[Plan, list[str]]:
    """The variants with their bit settings, and every setting in order (the report's columns).

    ``preset="leaderboard"``: every calibration-only method (float and reconstruction-based methods aside) at
    :data:`LEADERBOARD_BITS` plus its own ``extra_settings``; otherwise ``methods`` x ``bits``."""
    if spec.preset is not None and spec.preset not in PRESETS:
        raise VitqError(f"unknown preset {spec.preset!r}; known: {', '.join(PRESETS)}")
    if spec.preset == "leaderboard":
        if spec.methods is not None or spec.bits is not None or spec.reference is not None:
            raise VitqError("--preset leaderboard chooses the methods and bits itself: drop --methods, --bits "
                            "and --reference")
        common = [parse_bits(text) for text in LEADERBOARD_BITS.split(",")]
        plan = [(Variant(name, name, {}), common + [b for b in method_class(name).extra_settings if b not in common])
                for name in method_names() if name != FLOAT and not method_class(name).reconstructs]
    else:
        bits = list(dict.fromkeys(parse_bits(text) for text in parse_list(
            DEFAULT_BITS if spec.bits is None else spec.bits, "bits")))
        plan = [(variant, bits) for variant in parse_variants(DEFAULT_METHODS if spec.methods is None
                                                              else spec.methods)]
    settings = list(dict.fromkeys(f"W{w}A{a}" for _, bits in plan for w, a in bits))
    return plan, settings


def compare_grid(request: ConfigRequest, plan: Plan, seeds: Sequence[int]) -> Grid:
    """Per seed, the (label, config) of every variant at each of its bit settings, all validated (methods and
    their options included) before any model or image is loaded."""
    grid = {seed: [(v.label, request.build(v.options, method=v.method, w_bits=w, a_bits=a, seed=seed))
                   for v, bits in plan for w, a in bits] for seed in seeds}
    for label, config in grid[seeds[0]]:
        try:
            method_class(config.method)(config)
        except VitqError as err:
            raise VitqError(f"--methods item {label!r}: {err}") from None
    return grid


class JournalLine(BaseModel):
    """One line of the journal, type-checked (a number is not a string): the run key and either the finished
    ``run`` or, for a cell that failed, its one-line ``error``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    run: CompareRun | None = None
    error: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> JournalLine:
        if (self.run is None) == (self.error is None):
            raise ValueError("a journal line holds either a run or an error")
        return self


class Journal:
    """``runs.jsonl`` in the compare folder: one line per finished run, appended (and flushed to disk) as soon as
    it finishes, so an interrupted grid can go on with ``resume``. A line is reused only for the very same run key.

    Without ``resume`` an existing non-empty journal is refused (its runs would be lost) unless ``overwrite``
    starts a new one. With ``resume`` a torn last line (the usual trace of a kill) is dropped with a warning;
    any other bad line is an error. A failed run's line (its error) is kept for the record but never reused:
    ``resume`` runs that cell again, and its later line supersedes the failure."""

    def __init__(self, path: Path, *, resume: bool, overwrite: bool = False) -> None:
        self.path = path
        self.done: dict[str, CompareRun] = {}
        self.failed: dict[str, str] = {}  # key -> error of the last failure of a run not done since
        exists = path.is_file() and path.stat().st_size > 0
        if exists and not resume and not overwrite:
            raise VitqError(f"{path} already holds runs; pass --resume to reuse them or --overwrite to start over")
        if resume and exists:
            self._read()
        elif exists:
            write_text(path, "")

    def _read(self) -> None:
        try:
            text = self.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise VitqError(f"{self.path} is not UTF-8 text ({err.reason} at byte {err.start}); remove it or pass "
                            "--overwrite") from None
        lines = text.split("\n")
        torn = lines[-1]  # after the last newline: empty unless the last write was cut off
        for number, line in enumerate(lines[:-1], 1):
            try:
                entry = JournalLine.model_validate_json(line)
            except ValidationError as err:
                where, message, _ = first_error(err)
                raise VitqError(f"{self.path} line {number} is not a compare run ({where or 'line'}: {message}); "
                                "remove it or pass --overwrite") from None
            key = canonical_key(entry.key)
            if entry.run is not None:
                self.done[key] = entry.run
                self.failed.pop(key, None)
            elif entry.error is not None and key not in self.done:
                self.failed[key] = entry.error
        if torn:
            print(f"vitq: warning: {self.path}: dropped a cut-off last line (an interrupted write); its run "
                  "runs again", file=sys.stderr)
            write_text(self.path, "".join(line + "\n" for line in lines[:-1]))

    def add(self, key: str, run: CompareRun) -> None:
        """Append a finished run."""
        self._append({"key": key, "run": asdict(run)})

    def add_failure(self, key: str, error: str) -> None:
        """Append a failed run: its one-line error (``resume`` runs it again)."""
        self._append({"key": key, "error": error})

    def _append(self, line: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def canonical_key(key: str) -> str:
    """A journaled run key as the current code writes it: its configuration re-validated, so settings added
    since the line was written take their defaults (every new setting defaults to the old behaviour) and a line
    from before a setting existed still matches the same run. A key that no longer validates stays as it is."""
    try:
        fields = json.loads(key)
        fields["config"] = QuantConfig.model_validate(fields["config"]).model_dump(mode="json")
    except (KeyError, TypeError, ValueError, AttributeError):
        return key
    return json.dumps(fields, sort_keys=True)


def run_key(spec: RunSpec, label: str, config: QuantConfig, split: Split) -> str:
    """Everything a compare run's numbers depend on (and its label in the report), as one string. The device
    and a labels file are named only when they are not the defaults (the CPU, labels from file names), so the
    keys of journals written before they existed stay valid."""
    fields = {"model": spec.model, "checkpoint": None if spec.checkpoint is None else str(spec.checkpoint),
              "data": str(spec.data), "label": label, "config": config.model_dump(mode="json"),
              "eval_images": hashlib.sha256(json.dumps(split.eval).encode()).hexdigest()[:16],
              "batch_size": spec.batch_size}
    if spec.device != "cpu":
        fields["device"] = spec.device
    if spec.labels is not None:
        fields["labels"] = str(spec.labels)
    return json.dumps(fields, sort_keys=True)


def _no_baseline(seed: int) -> str:
    """The error of a cell whose seed's float run failed (its paired drop has nothing to be measured against)."""
    return f"no float baseline: the float run of seed {seed} failed"


class Cells:
    """The driver's side of the cells of one grid: each finished cell becomes its report row and journal line as
    soon as its seed's float top-1 is known (a cell that finishes before its seed's float run waits for it), a
    failed cell becomes a :class:`FailedRun`; every cell is reported with one progress line."""

    def __init__(self, cells: Sequence[Cell], journal: Journal, report: Callable[[str], None]) -> None:
        self.cells, self.journal, self.report = list(cells), journal, report
        self.runs: dict[str, CompareRun] = {}
        self.failures: dict[str, FailedRun] = {}
        self.float_top1: dict[int, float] = {}
        self.float_failed: dict[int, str] = {}
        self.waiting: dict[int, list[tuple[Cell, CellResult]]] = {}

    def todo(self) -> list[Cell]:
        """The cells to run, in plan order; a journaled cell is read back (and reported) instead."""
        todo = []
        for cell in self.cells:
            run = self.journal.done.get(cell.key)
            if run is None:
                todo.append(cell)
                continue
            self.report(f"seed {cell.split.seed}: {cell.label} {cell.setting}: top-1 {run.top1:.2f} % "
                        f"(from {self.journal.path.name})")
            self.runs[cell.key] = run
            if cell.is_float:
                self.float_top1[cell.split.seed] = run.top1
        return todo

    def finish(self, cell: Cell, outcome: CellResult | CellFailure) -> None:
        """Record the outcome of ``cell`` (journal, progress line), or keep it until its float top-1 is known."""
        seed = cell.split.seed
        if isinstance(outcome, CellFailure):
            self._fail(cell, outcome.error, outcome.internal)
            if cell.is_float:
                self.float_failed[seed] = outcome.error
                for other, _ in self.waiting.pop(seed, []):
                    self._fail(other, _no_baseline(seed), False)
        elif cell.is_float:
            self._add(cell, outcome, outcome.top1)
            self.float_top1[seed] = outcome.top1
            for other, result in self.waiting.pop(seed, []):
                self._add(other, result, outcome.top1)
        elif seed in self.float_top1:
            self._add(cell, outcome, self.float_top1[seed])
        elif seed in self.float_failed:
            self._fail(cell, _no_baseline(seed), False)
        else:
            self.waiting.setdefault(seed, []).append((cell, outcome))

    def _add(self, cell: Cell, result: CellResult, float_top1: float) -> None:
        self.report(f"seed {cell.split.seed}: {cell.label} {cell.setting}: {result.summary}, "
                    f"calibration {result.calib_seconds:.1f} s")
        run = CompareRun(method=cell.label, setting=cell.setting, seed=cell.split.seed, n_images=result.n_images,
                         top1=result.top1, top5=result.top5, float_top1=float_top1,
                         calib_seconds=result.calib_seconds, eval_seconds=result.eval_seconds,
                         size_mb=result.size_mb)
        self.journal.add(cell.key, run)
        self.runs[cell.key] = run

    def _fail(self, cell: Cell, error: str, internal: bool) -> None:
        self.report(f"seed {cell.split.seed}: {cell.label} {cell.setting}: failed: {error}")
        self.journal.add_failure(cell.key, error)
        self.failures[cell.key] = FailedRun(cell.label, cell.setting, cell.split.seed, error, internal)

    def outcome(self) -> tuple[list[CompareRun], list[FailedRun]]:
        """The finished runs and the failures, both in plan order (whatever order the cells finished in)."""
        left = [cell for cells in self.waiting.values() for cell, _ in cells]
        for cell in left:  # an executor that never gave the float run's outcome: a bug, still recorded
            self._fail(cell, f"no float baseline: the float run of seed {cell.split.seed} never finished", True)
        self.waiting.clear()
        return ([self.runs[c.key] for c in self.cells if c.key in self.runs],
                [self.failures[c.key] for c in self.cells if c.key in self.failures])


def compare_meta(spec: RunSpec, compare: CompareSpec, cache: ImageCache, splits: Sequence[Split],
                 reference: str | None) -> list[tuple[str, str]]:
    """The provenance lines at the top of the compare report."""
    meta = [
        ("date", datetime.now().astimezone().isoformat(timespec="seconds")),
        ("command", f"`{compare.command}`"),
        ("model", spec.model),
        ("checkpoint", "timm pretrained weights" if spec.checkpoint is None
         else f"{spec.checkpoint} (sha256 {sha256_prefix(spec.checkpoint)}…)"),
        ("data", str(cache.dataset.root)),
        ("evaluation images", f"{len(splits[0].eval)} per seed (calibration: {len(splits[0].calib)}, disjoint)"),
        ("seeds", ", ".join(str(s.seed) for s in splits)),
        ("machine", machine_summary()),
    ]
    return meta + ([("paired reference", reference)] if reference else [])


def grid_cells(spec: RunSpec, grid: Grid, splits: Sequence[Split], calib_size: int) -> list[Cell]:
    """Every cell in plan order: per seed, the float baseline first, then the grid's variants and bits."""
    cells = []
    for split in splits:
        float_config = make(QuantConfig, method=FLOAT, calib_size=calib_size, seed=split.seed)
        for label, config in [(FLOAT, float_config), *grid[split.seed]]:
            cells.append(Cell(run_key(spec, label, config, split), label, config, split))
    return cells


def open_executor(choice: ExecutorSpec, bench: Workbench) -> Executor:
    """The executor ``choice`` names; ``bench`` is the driver's model and images (the local executor's own)."""
    if choice.kind == "ray":
        context = CellContext(bench.spec, threads=torch.get_num_threads())
        return RayExecutor(context, address=choice.ray_address, cpus_per_task=choice.cpus_per_task)
    return LocalExecutor(bench)


def run_compare(spec: RunSpec, compare: CompareSpec, report: Callable[[str], None] = print) -> CompareOutcome:
    """Every variant x bit setting against float, per seed on the same images; writes md, csv and png (and
    ``leaderboard.md`` for the leaderboard preset) into ``compare.out_dir``.

    A failed cell does not stop the others: it is in the journal, the report and ``failures`` of the outcome."""
    plan, settings = compare_plan(compare)
    reference = parse_reference(compare.reference, [variant for variant, _ in plan])
    seeds = list(dict.fromkeys(parse_seed(text) for text in parse_list(compare.seeds, "seeds")))
    compare.executor.check()
    out_dir = compare.out_dir
    if out_dir is None:
        if compare.preset != "leaderboard":
            raise VitqError("compare needs --out-dir DIR (the folder for the report and the run journal)")
        out_dir = LEADERBOARD_DIR
    check_folder_output(out_dir, overwrite=True, what="--out-dir")
    journal = Journal(out_dir / JOURNAL_FILE, resume=compare.resume, overwrite=compare.overwrite)
    grid = compare_grid(compare.request, plan, seeds)
    calib_size = grid[seeds[0]][0][1].calib_size
    bench = Workbench(spec)
    splits = [bench.cache.split(calib_size, seed, spec.limit) for seed in seeds]
    cells = Cells(grid_cells(spec, grid, splits, calib_size), journal, report)
    todo = cells.todo()
    if todo:
        with open_executor(compare.executor, bench) as executor:
            for cell, outcome in executor.run(todo):
                cells.finish(cell, outcome)
    runs, failures = cells.outcome()
    if reference is not None and not any(run.method == reference for run in runs):
        reference = None  # every run of the reference failed: there is nothing to pair with (see the failures)
    meta = compare_meta(spec, compare, bench.cache, splits, reference)
    paths = write_compare_report(out_dir, f"vitq compare: {spec.model}", meta, runs, settings, reference=reference,
                                 failures=failures)
    if compare.preset == "leaderboard":
        paths["leaderboard"] = write_leaderboard(out_dir / "leaderboard.md", spec.model, meta, runs, settings)
    return CompareOutcome(runs, reference, paths, failures)
