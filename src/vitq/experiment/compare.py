"""The comparison engine behind ``vitq compare``: methods (with their own options) x bit settings x seeds
against the float model, every run on the same images per seed, journaled so a long grid can resume.

    spec = RunSpec.resolve()
    outcome = run_compare(spec, CompareSpec(methods="minmax,percentile", bits="W8A8,W4A4", seeds="0,1",
                                            out_dir=Path("runs/compare")))

The plan and every configuration are validated before any model or image is loaded. Each finished run is one
line of the journal ``runs.jsonl`` keyed by everything its numbers depend on (:func:`run_key`); with
``resume`` a run whose key is there is read back instead of run again.
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

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vitq.config import QuantConfig, first_error, make
from vitq.data import ImageCache, Split
from vitq.errors import VitqError
from vitq.eval.size import model_size
from vitq.experiment.grammar import (
    FLOAT,
    Variant,
    parse_bits,
    parse_list,
    parse_reference,
    parse_seed,
    parse_variants,
)
from vitq.experiment.runs import MB, ConfigRequest, RunSpec, evaluate_on_split, quantize_on_split
from vitq.files import check_folder_output, write_text
from vitq.methods import method_class, method_names
from vitq.report import CompareRun, machine_summary, sha256_prefix, write_compare_report
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
    the output folder, whether to resume its journal (or start it over an existing one: ``overwrite``), and the
    command line for the report's provenance."""

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


@dataclass
class CompareOutcome:
    runs: list[CompareRun]
    reference: str | None
    paths: dict[str, Path]


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
    """One line of the journal: the run key and the run, type-checked (a number is not a string)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str
    run: CompareRun


class Journal:
    """``runs.jsonl`` in the compare folder: one line per finished run, appended (and flushed to disk) as soon as
    it finishes, so an interrupted grid can go on with ``resume``. A line is reused only for the very same run key.

    Without ``resume`` an existing non-empty journal is refused (its runs would be lost) unless ``overwrite``
    starts a new one. With ``resume`` a torn last line (the usual trace of a kill) is dropped with a warning;
    any other bad line is an error."""

    def __init__(self, path: Path, *, resume: bool, overwrite: bool = False) -> None:
        self.path = path
        self.done: dict[str, CompareRun] = {}
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
            self.done[canonical_key(entry.key)] = entry.run
        if torn:
            print(f"vitq: warning: {self.path}: dropped a cut-off last line (an interrupted write); its run "
                  "runs again", file=sys.stderr)
            write_text(self.path, "".join(line + "\n" for line in lines[:-1]))

    def add(self, key: str, run: CompareRun) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "run": asdict(run)}) + "\n")
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
    """Everything a compare run's numbers depend on (and its label in the report), as one string."""
    return json.dumps({"model": spec.model, "checkpoint": None if spec.checkpoint is None else str(spec.checkpoint),
                       "data": str(spec.data), "label": label, "config": config.model_dump(mode="json"),
                       "eval_images": hashlib.sha256(json.dumps(split.eval).encode()).hexdigest()[:16],
                       "batch_size": spec.batch_size}, sort_keys=True)


def run_cell(model: nn.Module, spec: RunSpec, label: str, config: QuantConfig, cache: ImageCache, split: Split,
             float_top1: float | None, journal: Journal, report: Callable[[str], None] = print) -> CompareRun:
    """Quantize (a copy of) ``model`` and evaluate it on ``split`` as the report's ``label``;
    ``float_top1=None`` for the float run. Reuses a journaled run with the same key."""
    key = run_key(spec, label, config, split)
    setting = FLOAT if config.method == FLOAT else f"W{config.w_bits}A{config.a_bits}"
    if key in journal.done:
        run = journal.done[key]
        report(f"seed {split.seed}: {label} {setting}: top-1 {run.top1:.2f} % (from {journal.path.name})")
        return run
    qmodel, calib_seconds = quantize_on_split(model, spec.model, config, cache, split, progress=spec.progress,
                                              inplace=False)
    result = evaluate_on_split(qmodel, cache, split, spec)
    report(f"seed {split.seed}: {label} {setting}: {result.summary()}, calibration {calib_seconds:.1f} s")
    run = CompareRun(method=label, setting=setting, seed=split.seed, n_images=result.n_images,
                     top1=result.top1, top5=result.top5,
                     float_top1=result.top1 if float_top1 is None else float_top1,
                     calib_seconds=calib_seconds, eval_seconds=result.seconds,
                     size_mb=model_size(qmodel).quantized_bytes / MB)
    journal.add(key, run)
    return run


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


def run_compare(spec: RunSpec, compare: CompareSpec, report: Callable[[str], None] = print) -> CompareOutcome:
    """Every variant x bit setting against float, per seed on the same images; writes md, csv and png (and
    ``leaderboard.md`` for the leaderboard preset) into ``compare.out_dir``."""
    plan, settings = compare_plan(compare)
    reference = parse_reference(compare.reference, [variant for variant, _ in plan])
    seeds = list(dict.fromkeys(parse_seed(text) for text in parse_list(compare.seeds, "seeds")))
    out_dir = compare.out_dir
    if out_dir is None:
        if compare.preset != "leaderboard":
            raise VitqError("compare needs --out-dir DIR (the folder for the report and the run journal)")
        out_dir = LEADERBOARD_DIR
    check_folder_output(out_dir, overwrite=True, what="--out-dir")
    journal = Journal(out_dir / JOURNAL_FILE, resume=compare.resume, overwrite=compare.overwrite)
    grid = compare_grid(compare.request, plan, seeds)
    calib_size = grid[seeds[0]][0][1].calib_size
    model = spec.float_model()
    cache = spec.image_cache(model)
    splits = [cache.split(calib_size, seed, spec.limit) for seed in seeds]
    cache.preload(sorted({i for s in splits for i in s.calib + s.eval}))  # decode the grid's images once, if they fit
    runs = []
    for split in splits:
        float_config = make(QuantConfig, method=FLOAT, calib_size=calib_size, seed=split.seed)
        baseline = run_cell(model, spec, FLOAT, float_config, cache, split, None, journal, report)
        runs.append(baseline)
        runs += [run_cell(model, spec, label, config, cache, split, baseline.top1, journal, report)
                 for label, config in grid[split.seed]]
    meta = compare_meta(spec, compare, cache, splits, reference)
    paths = write_compare_report(out_dir, f"vitq compare: {spec.model}", meta, runs, settings, reference=reference)
    if compare.preset == "leaderboard":
        paths["leaderboard"] = write_leaderboard(out_dir / "leaderboard.md", spec.model, meta, runs, settings)
    return CompareOutcome(runs, reference, paths)
