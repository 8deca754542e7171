"""``vitq compare --executor ray``: the same journal and tables as the in-process executor, ``--resume``, failed
cells, and the one-line error without Ray. A random-init ``test_vit`` on a few synthetic JPEGs labelled with the
float model's own predictions (so top-1 is not trivially 0 and a numeric difference would show)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import self_labelled_folder

from vitq.cli import main
from vitq.experiment.compare import JOURNAL_FILE, Journal
from vitq.experiment.executors import RAY_MISSING, ExecutorSpec

MODEL, N_IMAGES, CALIB = "test_vit", 8, 2
#: fields of a journaled run that are wall-clock measurements (differ between any two runs, local or not)
TIMING_FIELDS = ("calib_seconds", "eval_seconds")
#: options validate (a positive group size) but test_vit's layers do not split into groups of 7: the cell fails
FAILING = "gptq[group_size=7]"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A random ``test_vit`` checkpoint and images named after the class the float model predicts for each."""
    checkpoint, data = self_labelled_folder(tmp_path_factory.mktemp("executors"), N_IMAGES, MODEL)
    return {"checkpoint": checkpoint, "data": data}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local two-CPU Ray for the whole module (starting one costs seconds); the executor reuses it."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _compare(files, out_dir: Path, *extra, methods: str = "minmax,percentile", bits: str = "W4A4") -> list[str]:
    return ["compare", "--methods", methods, "--bits", bits, "--seeds", "0", "--model", MODEL,
            "--checkpoint", str(files["checkpoint"]), "--data", str(files["data"]), "--calib-size", str(CALIB),
            "--no-progress", "--threads", "1", "--out-dir", str(out_dir), *map(str, extra)]


def _journal(out_dir: Path) -> dict[str, dict]:
    """The journal's entries by key, without the wall-clock fields."""
    entries = {}
    for line in (out_dir / JOURNAL_FILE).read_text().splitlines():
        entry = json.loads(line)
        if "run" in entry:
            entry["run"] = {k: v for k, v in entry["run"].items() if k not in TIMING_FIELDS}
        entries[entry["key"]] = entry
    return entries


def _csv(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "compare.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in csv.DictReader(f)]


def test_ray_gives_the_local_journal_and_tables(files, ray_cluster, tmp_path, capsys):
    """Same seeds, same thread count, same images: every number but the wall-clock seconds is identical.

    The journal's line order is the order the cells finished in (under Ray: any); the report is in plan order."""
    threads = torch.get_num_threads()
    assert main(_compare(files, tmp_path / "local")) == 0
    assert torch.get_num_threads() == 1  # --threads 1 set it for the driver, and the Ray tasks get the same
    local_out = capsys.readouterr().out
    assert main(_compare(files, tmp_path / "ray", "--executor", "ray")) == 0
    ray_out = capsys.readouterr().out
    torch.set_num_threads(threads)
    local, remote = _journal(tmp_path / "local"), _journal(tmp_path / "ray")
    assert len(local) == 3 and remote == local
    top1 = {e["run"]["method"]: e["run"]["top1"] for e in local.values()}
    assert top1["float"] == 100.0 and 0 <= top1["minmax"] <= 100.0  # labels are the float model's predictions
    assert _csv(tmp_path / "ray") == _csv(tmp_path / "local")
    assert [r["method"] for r in _csv(tmp_path / "ray")] == ["float", "minmax", "percentile"]

    def table(out: str) -> list[str]:  # the summary table without its calibration-seconds column
        return [line.rsplit("  ", 1)[0] for line in out.splitlines() if line.startswith(("float ", "minmax ", "perc"))]

    assert table(ray_out) == table(local_out) and len(table(ray_out)) == 3
    for line in ("seed 0: float float: top-1", "seed 0: minmax W4A4: top-1", "seed 0: percentile W4A4: top-1"):
        assert line in ray_out


def test_ray_resume_skips_journaled_cells(files, ray_cluster, tmp_path, capsys):
    out_dir = tmp_path / "grid"
    assert main(_compare(files, out_dir, "--executor", "ray", methods="minmax")) == 0
    first = _journal(out_dir)
    capsys.readouterr()
    assert main(_compare(files, out_dir, "--executor", "ray", "--resume", methods="minmax,percentile")) == 0
    out = capsys.readouterr().out
    assert out.count(f"(from {JOURNAL_FILE})") == 2 and "seed 0: percentile W4A4: top-1" in out
    lines = (out_dir / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 3  # only the new cell was run and journaled
    assert {k: v for k, v in _journal(out_dir).items() if k in first} == first


def test_ray_failed_cell_is_reported_recorded_and_retried(files, ray_cluster, tmp_path, capsys):
    out_dir = tmp_path / "failing"
    code = main(_compare(files, out_dir, "--executor", "ray", methods=f"minmax,{FAILING}"))
    out, err = capsys.readouterr()
    assert code == 2  # a problem with the input (the option does not fit the model), not a bug
    assert f"seed 0: {FAILING} W4A4: failed: " in out and "groups of 7" in out
    assert err.strip().splitlines() == [err.strip()] and "1 of 3 runs failed" in err
    # what succeeded is written: tables without the failed run, which the report lists with its error
    assert [r["method"] for r in _csv(out_dir)] == ["float", "minmax"]
    md = (out_dir / "compare.md").read_text()
    assert "## Failed runs" in md and f"| {FAILING} | W4A4 | 0 | " in md
    entries = list(_journal(out_dir).values())
    failed = [e for e in entries if "error" in e]
    assert len(entries) == 3 and len(failed) == 1 and "groups of 7" in failed[0]["error"]
    journal = Journal(out_dir / JOURNAL_FILE, resume=True)
    assert len(journal.done) == 2 and len(journal.failed) == 1
    # --resume runs the failed cell again (and only it); it fails again the same way
    code = main(_compare(files, out_dir, "--executor", "ray", "--resume", methods=f"minmax,{FAILING}"))
    out, _ = capsys.readouterr()
    assert code == 2 and out.count(f"(from {JOURNAL_FILE})") == 2 and f"{FAILING} W4A4: failed" in out
    # the same grid in-process: the same outcome
    code = main(_compare(files, tmp_path / "local", methods=f"minmax,{FAILING}"))
    capsys.readouterr()
    assert code == 2 and _journal(tmp_path / "local") == _journal(out_dir)  # same keys, runs and error
    assert [r["method"] for r in _csv(tmp_path / "local")] == ["float", "minmax"]


def test_executor_ray_without_ray_is_one_error_line(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(_compare(files, tmp_path / "x", "--executor", "ray")) == 2
    out, err = capsys.readouterr()
    assert err == f"vitq: error: {RAY_MISSING}\n" and out == ""
    assert RAY_MISSING == '--executor ray needs Ray: pip install "vitq[ray]"'
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_ray_address_needs_executor_ray(files, tmp_path, capsys):
    assert main(_compare(files, tmp_path / "x", "--ray-address", "auto")) == 2
    assert capsys.readouterr().err == "vitq: error: --ray-address needs --executor ray\n"
    with pytest.raises(Exception, match="unknown executor"):
        ExecutorSpec(kind="dask").check()  # type: ignore[arg-type]


def test_old_journal_lines_still_read(tmp_path):
    """A journal written before failures were journaled (run lines only) reads as before."""
    run = {"method": "minmax", "setting": "W8A8", "seed": 0, "n_images": 4, "top1": 50.0, "top5": 75.0,
           "float_top1": 75.0, "calib_seconds": 0.1, "eval_seconds": 0.1, "size_mb": 1.0}
    path = tmp_path / JOURNAL_FILE
    path.write_text(json.dumps({"key": "k", "run": run}) + "\n" + json.dumps({"key": "k2", "error": "boom"}) + "\n"
                    + json.dumps({"key": "k2", "run": run}) + "\n")
    journal = Journal(path, resume=True)
    assert set(journal.done) == {"k", "k2"} and journal.failed == {}  # a later success supersedes the failure
    path.write_text(json.dumps({"key": "k", "run": run, "error": "both"}) + "\n")
    with pytest.raises(Exception, match="line 1"):
        Journal(path, resume=True)


def test_run_key_names_a_device_and_labels_file_only_when_not_the_default(tmp_path):
    from dataclasses import replace

    from vitq.config import QuantConfig
    from vitq.data import Split
    from vitq.experiment.compare import run_key
    from vitq.experiment.runs import RunSpec

    spec, config, split = RunSpec("test_vit", None, tmp_path), QuantConfig(), Split(0, [0], [1, 2])
    cpu = json.loads(run_key(spec, "minmax", config, split))
    assert "device" not in cpu and "labels" not in cpu  # journals written before either existed stay valid
    gpu = json.loads(run_key(replace(spec, device="cuda:0", labels=tmp_path / "l.txt"), "minmax", config, split))
    assert gpu.pop("device") == "cuda:0" and gpu.pop("labels") == str(tmp_path / "l.txt") and gpu == cpu
