"""Tests of vitq.report: table and CSV writers, statistics, provenance, the compare report and plot."""

import math

import pytest

from vitq.report import (
    CompareRun,
    format_mean_std,
    format_value,
    machine_summary,
    markdown_table,
    mean_std,
    peak_rss_mb,
    plot_compare,
    sha256_prefix,
    text_table,
    write_compare_report,
    write_csv,
)
from vitq.report.compare import paired_deltas, plot_series, summary_columns, summary_rows
from vitq.report.plots import plot_pareto

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["name", "top-1", "n"]
ROWS = [["a|b", 79.125, 3], ["c", None, 10]]


def test_format_value():
    assert format_value(None) == ""
    assert format_value(1.23456) == "1.23"
    assert format_value(1.23456, precision=3) == "1.235"
    assert format_value(7) == "7"
    assert format_value(True) == "True"
    assert format_value(math.inf) == "inf"
    assert format_value("x") == "x"


def test_markdown_table():
    expected = ("| name | top-1 | n |\n"
                "| --- | ---: | ---: |\n"
                "| a\\|b | 79.12 | 3 |\n"
                "| c |  | 10 |\n")
    assert markdown_table(COLUMNS, ROWS) == expected


def test_markdown_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="2 cells, expected 3"):
        markdown_table(COLUMNS, [["a", 1]])


def test_text_table():
    expected = ("name  top-1   n\n"
                "----  -----  --\n"
                "a|b   79.12   3\n"
                "c            10\n")
    assert text_table(COLUMNS, ROWS) == expected


def test_write_csv(tmp_path):
    path = write_csv(tmp_path / "sub" / "t.csv", COLUMNS, [["a,b", 79.125, 3], ["c", None, 10]])
    assert path.read_text() == 'name,top-1,n\n"a,b",79.125,3\nc,,10\n'


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    assert format_mean_std([1.0, 2.0, 3.0]) == "2.00 ± 1.00"
    with pytest.raises(ValueError):
        mean_std([])


def test_runinfo(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    assert sha256_prefix(path) == "ba7816bf8f01"  # sha256("abc")
    assert peak_rss_mb() > 1
    assert "CPUs, torch " in machine_summary()


def test_plot_compare_writes_png(tmp_path):
    path = plot_compare(tmp_path / "p.png", ["W8A8", "W4A4"],
                        {"minmax": ([70.0, 40.0], [1.0, 2.0]), "percentile": ([71.0, math.nan], [0.5, 0.0])},
                        float_level=72.0, title="t")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plot_pareto_writes_png(tmp_path):
    path = plot_pareto(tmp_path / "pareto.png", {"gptq uniform": ([2.6, 3.2, 4.4], [60.0, 75.0, 79.0], [1.0, 0.5, 0.2]),
                                                 "gptq mixed": ([2.6, 3.2], [66.0, 76.5], [0.8, 0.4])},
                       float_level=79.6, title="t")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def _runs():
    runs = []
    for seed, (f, m) in enumerate([(80.0, 70.0), (82.0, 70.0)]):
        runs.append(CompareRun("float", "float", seed, 10, f, 95.0, f, 0.0, 1.0, 22.9))
        runs.append(CompareRun("minmax", "W8A8", seed, 10, m, 90.0, f, 2.0, 1.0, 6.0))
    return runs


def test_summary_rows_pair_the_drop_by_seed():
    rows = summary_rows(_runs())
    assert rows[0][:4] == ["float", "float", 2, "81.00 ± 1.41"]
    assert rows[1] == ["minmax", "W8A8", 2, "70.00 ± 0.00", 90.0, "11.00 ± 1.41", 2.0]


def test_write_compare_report(tmp_path):
    paths = write_compare_report(tmp_path, "vitq compare: m", [("seeds", "0, 1")], _runs(), ["W8A8"])
    md = paths["markdown"].read_text()
    assert md.startswith("# vitq compare: m\n")
    assert "- seeds: 0, 1" in md
    assert "| minmax | W8A8 | 2 | 70.00 ± 0.00 | 90.00 | 11.00 ± 1.41 | 2.00 |" in md
    assert "![top-1 vs bit setting](compare.png)" in md
    lines = paths["csv"].read_text().splitlines()
    assert lines[0] == ("method,setting,seed,n_images,top1,top5,float_top1,calib_seconds,eval_seconds,size_mb,drop")
    assert lines[2] == "minmax,W8A8,0,10,70.0,90.0,80.0,2.0,1.0,6.0,10.0"
    assert len(lines) == 5
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)


VARIANT = "dopq-vit[softmax=log2;target=mean]"


def _variant_runs():
    """Two seeds x two settings: float, minmax and a labelled dopq-vit variant (the reference)."""
    runs = []
    for seed, (f, m8, v8, m4, v4) in enumerate([(80.0, 70.0, 75.0, 40.0, 60.0), (82.0, 72.0, 73.0, 44.0, 58.0)]):
        runs.append(CompareRun("float", "float", seed, 10, f, 95.0, f, 0.0, 1.0, 22.9))
        runs += [CompareRun("minmax", "W8A8", seed, 10, m8, 90.0, f, 2.0, 1.0, 6.0),
                 CompareRun(VARIANT, "W8A8", seed, 10, v8, 91.0, f, 3.0, 1.0, 6.0),
                 CompareRun("minmax", "W4A4", seed, 10, m4, 60.0, f, 2.0, 1.0, 3.0),
                 CompareRun(VARIANT, "W4A4", seed, 10, v4, 80.0, f, 3.0, 1.0, 3.0)]
    return runs


def test_paired_deltas_match_setting_and_seed():
    deltas = paired_deltas(_variant_runs(), VARIANT)
    assert deltas == {("minmax", "W8A8", 0): -5.0, (VARIANT, "W8A8", 0): 0.0,
                      ("minmax", "W4A4", 0): -20.0, (VARIANT, "W4A4", 0): 0.0,
                      ("minmax", "W8A8", 1): -1.0, (VARIANT, "W8A8", 1): 0.0,
                      ("minmax", "W4A4", 1): -14.0, (VARIANT, "W4A4", 1): 0.0}
    with pytest.raises(ValueError, match="no runs"):
        paired_deltas(_variant_runs(), "percentile")
    mismatched = [*_variant_runs()[:2], CompareRun(VARIANT, "W8A8", 0, 9, 75.0, 91.0, 80.0, 3.0, 1.0, 6.0)]
    with pytest.raises(ValueError, match="different images"):
        paired_deltas(mismatched, VARIANT)


def test_summary_rows_with_paired_reference():
    rows = summary_rows(_variant_runs(), VARIANT)
    assert summary_columns(VARIANT)[-1] == f"Δ top-1 vs {VARIANT} (paired)"
    assert [row[:2] + row[-1:] for row in rows] == [
        ["float", "float", None],
        ["minmax", "W8A8", "-3.00 ± 2.83"],  # mean of -5, -1; sample std sqrt(8)
        [VARIANT, "W8A8", "—"],
        ["minmax", "W4A4", "-17.00 ± 4.24"],  # mean of -20, -14; sample std sqrt(18)
        [VARIANT, "W4A4", "—"]]
    assert [row[:-1] for row in rows] == summary_rows(_variant_runs())  # the other columns are unchanged


def test_write_compare_report_with_reference(tmp_path):
    paths = write_compare_report(tmp_path, "t", [], _variant_runs(), ["W8A8", "W4A4"], reference=VARIANT)
    md = paths["markdown"].read_text()
    assert f"| {VARIANT} | W4A4 | 2 | 59.00 ± 1.41 | 80.00 | 22.00 ± 2.83 | 3.00 | — |" in md
    assert "| minmax | W4A4 | 2 | 42.00 ± 2.83 | 60.00 | 39.00 ± 1.41 | 2.00 | -17.00 ± 4.24 |" in md
    assert "| minmax | W4A4 | 1 | 10 | 44.00 | 60.00 | 82.00 | 38.00 | 2.00 | 1.00 | 3.00 | -14.00 |" in md
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].endswith(",size_mb,drop,reference,delta_top1_vs_reference")
    assert lines[1] == f"float,float,0,10,80.0,95.0,80.0,0.0,1.0,22.9,0.0,{VARIANT},"
    assert lines[4] == f"minmax,W4A4,0,10,40.0,60.0,80.0,2.0,1.0,3.0,40.0,{VARIANT},-20.0"
    assert lines[5] == f"{VARIANT},W4A4,0,10,60.0,80.0,80.0,3.0,1.0,3.0,20.0,{VARIANT},0.0"


def test_plot_series_are_keyed_by_label():
    series = plot_series(_variant_runs(), ["W8A8", "W4A4"])
    assert list(series) == ["minmax", VARIANT]
    assert series[VARIANT][0] == [74.0, 59.0]


def test_leaderboard_rows_put_float_first_and_show_paper_drops():
    from vitq.report.compare import CompareRun
    from vitq.report.leaderboard import leaderboard_rows, paper_drop

    def run(method, setting, seed, top1):
        return CompareRun(method, setting, seed, 10, top1, 90.0, 80.0, 1.0, 1.0, 1.0)

    runs = [run("repq-vit", "W4A4", 0, 62.0), run("float", "float", 0, 80.0), run("repq-vit", "W4A4", 1, 64.0)]
    rows = leaderboard_rows(runs, "deit_tiny_patch16_224")
    assert [r[:3] for r in rows] == [["float", "float", 1], ["repq-vit", "W4A4", 2]]
    assert rows[1][3] == "63.00 ± 1.41" and rows[1][4] == "17.00 ± 1.41"
    assert rows[1][5] == paper_drop("deit_tiny_patch16_224", "repq-vit", "W4A4") == "14.78 (APHQ-ViT T1)"
    assert paper_drop("deit_tiny_patch16_224", "minmax", "W4A4") == paper_drop("test_vit", "repq-vit", "W4A4") == ""
