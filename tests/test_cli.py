"""Tests of the ``vitq`` command line, run in-process on a few synthetic JPEGs and a random-init timm ``test_vit``
(a 6-block, 160 px ViT: the same code paths as DeiT-tiny at a fraction of the CPU time)."""

import csv
import json
import statistics
from pathlib import Path

import pytest
import timm
import torch
from helpers import write_images
from safetensors.torch import save_file

import vitq
from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE, assets_dir
from vitq.cli import main
from vitq.config import ReconConfig
from vitq.data import imagenet_wnids
from vitq.errors import VitqError
from vitq.experiment import CompareSpec, ConfigRequest, parse_option, parse_variants
from vitq.experiment.compare import compare_grid, compare_plan
from vitq.export.checkpoint import read_header
from vitq.methods import method_names

MODEL = "deit_tiny_patch16_224"
TEST_MODEL = "test_vit"
N_IMAGES, CALIB = 6, 2
EVAL_KEYS = {"top1", "top5", "top1_ci95", "n_images", "seconds", "calib_seconds", "peak_mem_mb", "images_per_s",
             "model", "method", "w_bits", "a_bits", "calib_size", "seed", "size_mb", "float_size_mb"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random-init ``test_vit`` checkpoint and a data folder of synthetic images."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = timm.create_model(TEST_MODEL, pretrained=False)
    checkpoint = root / "test_vit_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return {"root": root, "checkpoint": checkpoint, "data": write_images(root / "images", N_IMAGES)}


@pytest.fixture
def cli(capsys):
    """Run ``vitq ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _inputs(files, *, model=TEST_MODEL, checkpoint=None, data=None, calib=CALIB) -> list:
    return ["--model", model, "--checkpoint", checkpoint or files["checkpoint"], "--data", data or files["data"],
            "--calib-size", calib, "--no-progress"]


@pytest.fixture(scope="module")
def minmax_json(files):
    """JSON of ``vitq eval --method minmax --w-bits 8 --a-bits 8`` on the synthetic data."""
    path = files["root"] / "minmax.json"
    assert main(["eval", "--method", "minmax", "--w-bits", "8", "--a-bits", "8", *map(str, _inputs(files)),
                 "--json", str(path)]) == 0
    return json.loads(path.read_text())


# ---------------------------------------------------------------- inspect


def test_inspect_lists_every_slot_without_data(cli):
    code, out, err = cli("inspect", "--method", "minmax", "--w-bits", "4", "--override", "head=float",
                         "--no-progress")
    assert code == 0, err
    assert out.startswith(f"{MODEL} (vit family), minmax W4A8: 173 quantizer slots, 146 quantized")
    lines = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
    assert "uniform 4-bit channel" in lines["blocks.0.attn.qkv.weight_quantizer"]
    assert "uniform 8-bit tensor" in lines["blocks.0.attn.softmax.quantizer"]
    assert lines["head.weight_quantizer"].endswith("float")
    assert lines["blocks.11.mlp.fc2.input_quantizer"].split()[1] == "post_gelu"
    assert lines["blocks.0.norm1.input_quantizer"].split()[1:] == ["pre_ln", "float"]  # LayerNorm inputs: float


def test_inspect_float_method_with_checkpoint(cli, files):
    code, out, err = cli("inspect", "--model", TEST_MODEL, "--method", "float", "--checkpoint", files["checkpoint"])
    assert code == 0, err
    assert "89 quantizer slots, 0 quantized" in out


# ---------------------------------------------------------------- eval / quantize


def test_eval_float(cli, files):
    code, out, err = cli("eval", "--method", "float", *_inputs(files), "--threads", "2")
    assert code == 0, err
    assert "float: not quantized" in out
    assert f"on {N_IMAGES - CALIB} images" in out
    assert "size:" in out


def test_eval_minmax_json(minmax_json):
    result = minmax_json
    assert set(result) >= EVAL_KEYS
    assert 0 <= result["top1"] <= result["top5"] <= 100
    lo, hi = result["top1_ci95"]
    assert 0 <= lo <= result["top1"] <= hi <= 100
    assert result["n_images"] == N_IMAGES - CALIB
    assert (result["model"], result["method"], result["w_bits"], result["a_bits"]) == (TEST_MODEL, "minmax", 8, 8)
    assert (result["calib_size"], result["seed"]) == (CALIB, 0)
    assert result["seconds"] > 0 and result["images_per_s"] > 0 and result["calib_seconds"] > 0
    assert result["peak_mem_mb"] > 50
    assert 0 < result["size_mb"] < 0.5 * result["float_size_mb"]


def test_quantize_then_eval_quantized_matches_direct_eval(cli, files, minmax_json, tmp_path):
    out_dir = tmp_path / "q"
    code, out, err = cli("quantize", "--method", "minmax", *_inputs(files), "--output", out_dir,
                         "--json", tmp_path / "quantize_copy.json")
    assert code == 0, err
    assert "worst 5 points by SQNR" in out
    assert (out_dir / "model.safetensors").is_file()
    info = json.loads((out_dir / "quantize.json").read_text())
    assert json.loads((tmp_path / "quantize_copy.json").read_text()) == info
    assert info["config"]["method"] == "minmax"
    assert len(info["calibration_images"]) == CALIB
    assert all(item["file"].endswith("_x.JPEG") for item in info["calibration_images"])
    assert info["calib_seconds"] > 0 and info["peak_mem_mb"] > 0 and len(info["worst_points"]) == 5
    assert info["file_bytes"] == (out_dir / "model.safetensors").stat().st_size
    assert read_header(out_dir / "model.safetensors")["packed"]  # packed by default

    result_path = tmp_path / "eval.json"
    code, out, err = cli("eval", "--quantized", out_dir, "--data", files["data"], "--no-progress", "--sqnr",
                         "--json", result_path)
    assert code == 0, err
    result = json.loads(result_path.read_text())
    for key in ("top1", "top5", "n_images", "method", "w_bits", "a_bits", "calib_size", "seed", "size_mb"):
        assert result[key] == minmax_json[key], key
    assert result["calib_seconds"] == info["calib_seconds"]
    assert [p["point"] for p in result["sqnr"]][:2] == ["patch_embed.proj", "blocks.0.attn.qkv"]
    assert "per-point SQNR" in out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
@pytest.mark.parametrize("export_format", ["onnx", "onnxruntime"])
def test_export_onnx_then_eval_on_onnxruntime(cli, files, tmp_path, export_format):
    out_dir, onnx_file = tmp_path / "q", tmp_path / "model.onnx"
    assert cli("quantize", "--method", "minmax", "--a-bits", "6", *_inputs(files), "--override",
               "*attn.softmax=fp8_e4m3", "--output", out_dir)[0] == 0
    code, out, err = cli("export", out_dir, "--format", export_format, "--output", onnx_file)
    assert code == 0, err
    assert onnx_file.is_file() and "int8 weight" in out and "uint8 QDQ + clip" in out
    # a float-format softmax has no integer codes: a float path, named on stderr
    assert "blocks.0.attn.softmax.quantizer" in err and "float path" in err
    assert "--override '*attn.softmax=uniform:8'" in err  # with what would give it an integer form
    torch_json, ort_json = tmp_path / "torch.json", tmp_path / "ort.json"
    assert cli("eval", "--quantized", out_dir, "--data", files["data"], "--no-progress", "--json", torch_json)[0] == 0
    code, out, err = cli("eval", "--backend", "onnxruntime", "--model", onnx_file, "--data", files["data"],
                         "--threads", "1", "--no-progress", "--json", ort_json)
    assert code == 0, err
    on_torch, on_ort = json.loads(torch_json.read_text()), json.loads(ort_json.read_text())
    for key in ("n_images", "method", "w_bits", "a_bits", "calib_size", "seed", "model"):
        assert on_ort[key] == on_torch[key], key
    assert on_ort["backend"] == "onnxruntime" and on_ort["float_path_points"]
    assert abs(on_ort["top1"] - on_torch["top1"]) <= 100 / on_torch["n_images"]  # at most one image apart


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_weight_only_model_exports_packed_4_bit_weights(cli, files, tmp_path):
    out_dir, onnx_file = tmp_path / "q", tmp_path / "w4.onnx"
    assert cli("quantize", "--method", "minmax", "--w-bits", "4", "--a-bits", "16", *_inputs(files), "--output",
               out_dir)[0] == 0
    code, out, err = cli("export", out_dir, "--format", "onnxruntime", "--packed-weights", "--output", onnx_file)
    assert code == 0, err
    assert "4-bit weight (MatMulNBits)" in out and "QDQ" not in out and not err  # activations float: no QDQ
    torch_json, ort_json = tmp_path / "torch.json", tmp_path / "ort.json"
    assert cli("eval", "--quantized", out_dir, "--data", files["data"], "--no-progress", "--json", torch_json)[0] == 0
    assert cli("eval", "--backend", "onnxruntime", "--model", onnx_file, "--data", files["data"], "--threads", "1",
               "--no-progress", "--json", ort_json)[0] == 0
    on_torch, on_ort = json.loads(torch_json.read_text()), json.loads(ort_json.read_text())
    assert on_torch["a_bits"] == on_ort["a_bits"] == 16 and on_ort["top1"] == on_torch["top1"]


def test_sensitivity_writes_the_ranked_table_json_and_plot(cli, files, tmp_path):
    out = tmp_path / "sens"
    code, stdout, err = cli("sensitivity", "--method", "minmax", "--w-bits", "4", "--a-bits", "4", *_inputs(files),
                            "--hutchinson", "1", "--top", "3", "--out-dir", out)
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {"sensitivity.md", "sensitivity.json", "sensitivity.png"}
    saved = json.loads((out / "sensitivity.json").read_text())
    assert saved[0]["slot"] == "patch_embed.proj.weight_quantizer" and saved[0]["hessian_trace"] is not None
    table = (out / "sensitivity.md").read_text()
    assert "vitq sensitivity --method minmax" in table and f"{CALIB} calibration images" in table
    kls = [float(line.split("|")[5]) for line in [ln for ln in table.splitlines() if ln.startswith("| ")][2:]]
    assert len(kls) == len(saved) and kls == sorted(kls, reverse=True)
    assert stdout.count("\n") >= 5 and "most sensitive first" in stdout  # the top 3 on the terminal
    assert cli("sensitivity", *_inputs(files), "--out-dir", out)[0] == 2  # not empty: needs --overwrite


def test_sensitivity_of_a_weight_rewriting_method_measures_weights_on_its_twin(cli, files, tmp_path):
    out = tmp_path / "gptq"
    code, stdout, err = cli("sensitivity", "--method", "gptq", "--w-bits", "4", "--a-bits", "8", *_inputs(files),
                            "--hutchinson", "0", "--top", "2", "--budget", "bops=1000", "--menu", "3,8",
                            "--out-dir", out)
    assert code == 0, err
    assert "weights measured on `repq-vit`" in (out / "sensitivity.md").read_text()
    assert "GBOPs (budget 1000)" in stdout  # a generous budget: every weight stays at 8 bits
    assert all(line.endswith("=8") for line in (out / "overrides.txt").read_text().splitlines()
               if not line.startswith("#"))


def test_sensitivity_budget_writes_an_allocation_that_quantize_reads_back(cli, files, tmp_path):
    out, saved = tmp_path / "mp", tmp_path / "q"
    code, stdout, err = cli("sensitivity", "--method", "minmax", "--w-bits", "4", "--a-bits", "8", *_inputs(files),
                            "--hutchinson", "0", "--budget", "w-avg-bits=5", "--menu", "3,8", "--out-dir", out)
    assert code == 0, err
    assert "--budget w-avg-bits=5:" in stdout and "overrides.txt" in stdout
    lines = [line for line in (out / "overrides.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines and all(line.endswith(("=3", "=8")) for line in lines)
    assert cli("quantize", "--method", "minmax", "--w-bits", "4", "--a-bits", "8", *_inputs(files),
               "--overrides-file", out / "overrides.txt", "--output", saved)[0] == 0
    specs = read_header(saved / "model.safetensors")["quantizers"]
    assert {f"{name}={spec['bits']}" for name, spec in specs.items() if name.endswith("weight_quantizer")} == \
        set(lines)
    code, _, err = cli("sensitivity", *_inputs(files), "--budget", "w-avg-bits=5", "--budget", "w-size-mb=1",
                       "--out-dir", tmp_path / "two")
    assert code == 2 and "one --budget per role" in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_deploy_openvino_export_then_eval_on_openvino(cli, files, tmp_path):
    pytest.importorskip("openvino")
    out_dir, ir = tmp_path / "q", tmp_path / "ir"
    code, out, err = cli("quantize", "--method", "repq-vit", "--deploy", "openvino", *_inputs(files),
                         "--output", out_dir)
    assert code == 0, err
    assert json.loads((out_dir / "quantize.json").read_text())["config"]["deploy"] == "openvino"
    code, out, err = cli("export", out_dir, "--format", "openvino", "--output", ir)
    assert code == 0, err
    assert (ir / "model.xml").is_file() and (ir / "model.bin").is_file() and "int8 QDQ" in out
    assert "warning" not in err  # every point in the form OpenVINO's int8 kernels take
    torch_json, ov_json = tmp_path / "torch.json", tmp_path / "ov.json"
    assert cli("eval", "--quantized", out_dir, "--data", files["data"], "--no-progress", "--json", torch_json)[0] == 0
    code, out, err = cli("eval", "--backend", "openvino", "--model", ir, "--data", files["data"], "--threads", "1",
                         "--no-progress", "--json", ov_json)
    assert code == 0, err
    on_torch, on_ov = json.loads(torch_json.read_text()), json.loads(ov_json.read_text())
    for key in ("n_images", "method", "w_bits", "a_bits", "calib_size", "seed", "model"):
        assert on_ov[key] == on_torch[key], key
    assert on_ov["backend"] == "openvino" and on_ov["openvino_file"] == str(ir / "model.xml")
    assert on_ov["file_mb"] > 0 and on_ov["float_path_points"] == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's TorchScript ONNX exporter
def test_deploy_onnxruntime_rounds_the_reparameterized_zero_points(cli, files, tmp_path):
    for deploy in ([], ["--deploy", "onnxruntime"]):
        out_dir = tmp_path / f"q{len(deploy)}"
        assert cli("quantize", "--method", "repq-vit", *deploy, *_inputs(files), "--output", out_dir)[0] == 0
        code, out, err = cli("export", out_dir, "--output", tmp_path / f"m{len(deploy)}.onnx")
        assert code == 0, err
        fractional = "fractional zero point" in err
        assert fractional == (not deploy), err  # rounded by the target: integer QDQ
        assert ("quantizing with --deploy onnxruntime rounds them" in err) == (not deploy)


def test_export_openvino_names_the_points_its_int8_kernels_do_not_take(cli, files, tmp_path):
    pytest.importorskip("openvino")
    out_dir = tmp_path / "q"
    assert cli("quantize", "--method", "minmax", *_inputs(files), "--output", out_dir)[0] == 0
    code, out, err = cli("export", out_dir, "--format", "openvino", "--output", tmp_path / "ir")
    assert code == 0, err
    assert "blocks.0.attn.qkv.weight_quantizer has zero points" in err and "--deploy openvino" in err


def test_eval_integer_backend(cli, files, tmp_path):
    path = tmp_path / "int.json"
    code, out, err = cli("eval", "--method", "percentile", *_inputs(files), "--backend", "integer", "--json", path)
    assert code == 0, err
    assert "integer-only runtime" in out
    result = json.loads(path.read_text())
    assert result["backend"] == "integer" and result["n_images"] == N_IMAGES - CALIB


def test_eval_limit(cli, files, tmp_path):
    path = tmp_path / "r.json"
    code, _, err = cli("eval", "--method", "float", *_inputs(files), "--limit", "1", "--json", path)
    assert code == 0, err
    result = json.loads(path.read_text())
    assert result["n_images"] == 1 and result["w_bits"] is None


# ---------------------------------------------------------------- compare


def test_compare_writes_markdown_csv_and_plot(cli, files, tmp_path):
    out_dir = tmp_path / "cmp"
    code, out, err = cli("compare", "--methods", "minmax,percentile", "--bits", "W8A8", "--seeds", "0",
                         *_inputs(files), "--out-dir", out_dir)
    assert code == 0, err
    md = (out_dir / "compare.md").read_text()
    assert md.startswith(f"# vitq compare: {TEST_MODEL}")
    assert "`vitq compare --methods minmax,percentile --bits W8A8" in md
    assert "sha256 " in md and f"{N_IMAGES - CALIB} per seed" in md and "torch " in md
    assert "| minmax | W8A8 | 1 |" in md and "| percentile | W8A8 | 1 |" in md
    with (out_dir / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["setting"], r["seed"]) for r in rows] == [
        ("float", "float", "0"), ("minmax", "W8A8", "0"), ("percentile", "W8A8", "0")]
    for row in rows:
        assert float(row["drop"]) == pytest.approx(float(row["float_top1"]) - float(row["top1"]))
    assert (out_dir / "compare.png").stat().st_size > 1000
    assert "wrote" in out

    # the journal lets an interrupted or extended grid go on: finished runs are reused, new ones run
    journal = (out_dir / "runs.jsonl").read_text().splitlines()
    assert len(journal) == 3
    code, out, err = cli("compare", "--methods", "minmax,percentile,minmax[]", "--bits", "W8A8,W6A6", "--seeds", "0",
                         *_inputs(files), "--out-dir", out_dir, "--resume")
    assert code == 0, err
    assert out.count("(from runs.jsonl)") == 3 and "minmax W6A6: top-1" in out
    with (out_dir / "compare.csv").open() as f:
        again = {(r["method"], r["setting"]): r for r in csv.DictReader(f)}
    for row in rows:
        assert again[(row["method"], row["setting"])] == row
    assert len((out_dir / "runs.jsonl").read_text().splitlines()) == 5
    # a line written before a setting existed (here: no "reconstruct") matches the run with that setting's default
    entries = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines()]
    for entry in entries:
        key = json.loads(entry["key"])
        del key["config"]["reconstruct"]
        entry["key"] = json.dumps(key)
    (out_dir / "runs.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    code, out, err = cli("compare", "--methods", "minmax,percentile", "--bits", "W8A8", "--seeds", "0",
                         *_inputs(files), "--out-dir", out_dir, "--resume")
    assert code == 0, err
    assert out.count("(from runs.jsonl)") == 3
    # a broken journal is a one-line error (without --resume it would simply be started afresh)
    (out_dir / "runs.jsonl").write_text("not json\n")
    code, out, err = cli("compare", "--methods", "minmax", "--bits", "W8A8", "--seeds", "0", *_inputs(files),
                         "--out-dir", out_dir, "--resume")
    assert code == 2 and "runs.jsonl line 1" in err


UNIFORM, LOG2 = "dopq-vit[softmax=uniform;target=mean]", "dopq-vit[softmax=log2;target=mean]"


def _paired_cell(deltas: list[float]) -> str:
    """The summary cell recomputed independently: mean ± sample std over seeds, 2 decimals."""
    std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    return f"{statistics.fmean(deltas):.2f} ± {std:.2f}"


def test_compare_method_variants_with_paired_reference(cli, files, tmp_path):
    out_dir = tmp_path / "variants"
    code, out, err = cli("compare", "--methods", f"minmax, {UNIFORM.replace(';', '; ')},{LOG2}", "--bits", "W8A8",
                         "--seeds", "0,1", "--reference", LOG2, *_inputs(files), "--out-dir", out_dir)
    assert code == 0, err
    assert f"seed 1: {UNIFORM} W8A8:" in out
    with (out_dir / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in rows] == [
        (m, seed) for seed in "01" for m in ("float", "minmax", UNIFORM, LOG2)]
    assert {r["reference"] for r in rows} == {LOG2}
    top1 = {(r["method"], r["seed"]): float(r["top1"]) for r in rows}
    md = (out_dir / "compare.md").read_text()
    assert f"Δ top-1 vs {LOG2} (paired) |" in md and f"- paired reference: {LOG2}" in md
    for method in ("minmax", UNIFORM):
        deltas = [top1[(method, seed)] - top1[(LOG2, seed)] for seed in "01"]
        assert [float(r["delta_top1_vs_reference"]) for r in rows if r["method"] == method] == pytest.approx(deltas)
        assert f"| {method} | W8A8 | 2 | " in md
        assert md.split(f"| {method} | W8A8 | 2 | ")[1].splitlines()[0].endswith(f" | {_paired_cell(deltas)} |")
    assert md.split(f"| {LOG2} | W8A8 | 2 | ")[1].splitlines()[0].endswith(" | — |")
    assert [r["delta_top1_vs_reference"] for r in rows if r["method"] in ("float", LOG2)] == ["", "0.0", "", "0.0"]


def test_compare_variant_options_merge_over_global_options():
    request = ConfigRequest(options=dict(parse_option(text) for text in ("softmax=tanq", "ratio_bound=4")))
    variants = parse_variants(f"{LOG2},dopq-vit, dopq-vit[ratio_bound=null;tan_variant=tan] ,dopq-vit[]")
    assert [v.label for v in variants] == [LOG2, "dopq-vit", "dopq-vit[ratio_bound=null;tan_variant=tan]"]
    grid = compare_grid(request, [(v, [(8, 8), (4, 4)]) for v in variants], [0, 1])
    assert [(label, c.w_bits, c.seed) for label, c in grid[1]][:3] == [(LOG2, 8, 1), (LOG2, 4, 1), ("dopq-vit", 8, 1)]
    options = {label: c.options for label, c in grid[0]}
    assert options[LOG2] == {"softmax": "log2", "target": "mean", "ratio_bound": 4}
    assert options["dopq-vit"] == {"softmax": "tanq", "ratio_bound": 4}
    assert options["dopq-vit[ratio_bound=null;tan_variant=tan]"] == {"softmax": "tanq", "ratio_bound": None,
                                                                     "tan_variant": "tan"}


def test_compare_variants_choose_their_own_reconstruction():
    request = ConfigRequest(recon={"batch_size": 4})
    variants = parse_variants("dopq-vit,dopq-vit[recon=true],dopq-vit[recon.iterations=7;softmax=log2],qdrop")
    grid = dict(compare_grid(request, [(v, [(4, 4)]) for v in variants], [0])[0])
    assert grid["dopq-vit"].reconstruct == ReconConfig(batch_size=4)  # the global --recon reaches every run
    assert grid["dopq-vit[recon=true]"].reconstruct == ReconConfig(batch_size=4)
    assert grid["dopq-vit[recon=true]"].options == {}
    variant = grid["dopq-vit[recon.iterations=7;softmax=log2]"]
    assert variant.reconstruct == ReconConfig(batch_size=4, iterations=7) and variant.options == {"softmax": "log2"}
    plain = dict(compare_grid(ConfigRequest(), [(v, [(4, 4)]) for v in variants], [0])[0])
    assert plain["dopq-vit"].reconstruct is None and plain["qdrop"].reconstruct is None  # qdrop: its defaults
    assert plain["dopq-vit[recon.iterations=7;softmax=log2]"].reconstruct == ReconConfig(iterations=7)
    with pytest.raises(VitqError, match="recon must be true or false"):
        compare_grid(request, [(parse_variants("dopq-vit[recon=7]")[0], [(4, 4)])], [0])


def test_leaderboard_preset_plan():
    plan, settings = compare_plan(CompareSpec(preset="leaderboard"))
    bits = {variant.label: [f"W{w}A{a}" for w, a in b] for variant, b in plan}
    reconstruction = {"adaround", "aphq-vit", "brecq", "qdrop", "is-vit"}
    assert set(bits) == set(method_names()) - {"float", *reconstruction}  # calibration only
    assert bits["repq-vit"] == bits["noisyquant"] == ["W8A8", "W6A6", "W4A4", "W3A3"]
    assert bits["gptq"] == bits["erq"] == ["W8A8", "W6A6", "W4A4", "W3A3", "W3A4", "W4A8", "W4A16", "W3A16"]
    assert bits["percentile"] == ["W8A8", "W6A6", "W4A4", "W3A3", "W4A8", "W4A16", "W3A16"]  # round-to-nearest
    assert settings == ["W8A8", "W6A6", "W4A4", "W3A3", "W3A4", "W4A8", "W4A16", "W3A16"]


def test_leaderboard_preset_end_to_end(cli, files, tmp_path, monkeypatch):
    """The preset's mechanics on three methods (every method's plan is checked above)."""
    monkeypatch.setattr("vitq.experiment.compare.method_names", lambda: ["float", "minmax", "repq-vit", "gptq"])
    out_dir = tmp_path / "board"
    code, out, err = cli("compare", "--preset", "leaderboard", "--seeds", "0", *_inputs(files), "--limit", "2",
                         "--threads", "1", "--out-dir", out_dir)
    assert code == 0, err
    board = (out_dir / "leaderboard.md").read_text()
    assert (out_dir / "leaderboard.png").is_file() and (out_dir / "compare.md").is_file()
    for name in ("minmax", "repq-vit", "gptq"):
        assert f"| {name} | W4A4 | 1 |" in board
    assert "| gptq | W3A4 | 1 |" in board and "| minmax | W3A4 |" not in board
    assert board.index("| float | float |") < board.index("| minmax |")
    # the paper column: RepQ-ViT W4A4 DeiT-T 72.21 -> 57.43 (on test_vit the model differs: no paper number)
    assert "| repq-vit | W4A4 | 1 |" in board and "APHQ" not in board


# ---------------------------------------------------------------- bad input


def _bad_checkpoint(files) -> Path:
    path = files["root"] / "wrong.safetensors"
    save_file({"foo": torch.zeros(2)}, str(path))
    return path


def _bad_image_folder(files) -> Path:
    folder = write_images(files["root"] / "with_bad_image", 3)
    (folder / f"{imagenet_wnids()[5]}_broken.JPEG").write_bytes(b"not a jpeg at all")
    return folder


def _empty_folder(files) -> Path:
    folder = files["root"] / "empty"
    folder.mkdir(exist_ok=True)
    return folder


BAD_INPUTS = {
    "unknown model": (lambda f: ["eval", *_inputs(f, model="deit_tinyy_patch16_224")], ["unknown model"]),
    "inspect unknown model": (lambda f: ["inspect", "--model", "no_such_model"], ["unknown model"]),
    "unknown method": (lambda f: ["eval", "--method", "nope", *_inputs(f)], ["--method", "nope"]),
    "w bits too high": (lambda f: ["eval", "--w-bits", "9", *_inputs(f)], ["w_bits", "8"]),
    "a bits too low": (lambda f: ["quantize", "--a-bits", "1", *_inputs(f), "--output", "x"], ["a_bits", "2"]),
    "compare bits": (lambda f: ["compare", "--bits", "W9A8", *_inputs(f), "--out-dir", "x"], ["w_bits"]),
    "compare without out-dir": (lambda f: ["compare", *_inputs(f)], ["--out-dir"]),
    "leaderboard with methods": (lambda f: ["compare", "--preset", "leaderboard", "--methods", "minmax", *_inputs(f)],
                                 ["--preset leaderboard", "--methods"]),
    "compare bit syntax": (lambda f: ["compare", "--bits", "8bit", *_inputs(f), "--out-dir", "x"], ["W8A8"]),
    "compare variant without value": (lambda f: ["compare", "--methods", "minmax,dopq-vit[softmax]", *_inputs(f),
                                                  "--out-dir", "x"], ["dopq-vit[softmax]", "KEY=VALUE"]),
    "compare unclosed bracket": (lambda f: ["compare", "--methods", "dopq-vit[softmax=log2,minmax", *_inputs(f),
                                             "--out-dir", "x"], ["'dopq-vit[softmax=log2,minmax'", "METHOD["]),
    "compare stray bracket": (lambda f: ["compare", "--methods", "minmax]", *_inputs(f), "--out-dir", "x"],
                              ["'minmax]'"]),
    "compare variant unknown option": (lambda f: ["compare", "--methods", "minmax,dopq-vit[foo=1]", *_inputs(f),
                                                   "--out-dir", "x"], ["'dopq-vit[foo=1]'", "no option", "foo"]),
    "compare variant bad value": (lambda f: ["compare", "--methods", "dopq-vit[ratio_bound=0.5]", *_inputs(f),
                                              "--out-dir", "x"], ["ratio_bound", "0.5"]),
    "compare variant unknown method": (lambda f: ["compare", "--methods", "nope[a=1]", *_inputs(f), "--out-dir", "x"],
                                       ["unknown method 'nope'"]),
    "compare bad reference": (lambda f: ["compare", "--methods", "minmax,percentile", "--reference", "repq-vit",
                                         *_inputs(f), "--out-dir", "x"], ["--reference", "repq-vit", "minmax"]),
    "checkpoint mismatch": (lambda f: ["eval", *_inputs(f, checkpoint=_bad_checkpoint(f))], ["does not match"]),
    "checkpoint of another model": (lambda f: ["eval", *_inputs(f, model="test_vit2")], ["does not match"]),
    "missing checkpoint": (lambda f: ["eval", *_inputs(f, checkpoint=f["root"] / "nope.safetensors")],
                           ["checkpoint not found"]),
    "missing data": (lambda f: ["eval", *_inputs(f, data=f["root"] / "nowhere")], ["does not exist"]),
    "empty data": (lambda f: ["eval", *_inputs(f, data=_empty_folder(f))], ["no images"]),
    "unreadable image": (lambda f: ["eval", "--method", "minmax", *_inputs(f, data=_bad_image_folder(f), calib=1)],
                         ["cannot read image", "broken"]),
    "calib size too large": (lambda f: ["eval", *_inputs(f, calib=100)], ["calibration size 100", "larger"]),
    "bad override": (lambda f: ["eval", "--override", "head", *_inputs(f)], ["override", "PATTERN="]),
    "bad override kind": (lambda f: ["inspect", "--override", "head=bogus"], ["unknown quantizer kind"]),
    "unknown option": (lambda f: ["eval", "--method", "minmax", "--option", "foo=1", *_inputs(f)], ["no option"]),
    "missing quantized dir": (lambda f: ["eval", "--quantized", f["root"] / "nope", *_inputs(f)],
                              ["nope", "does not exist"]),
    "bad limit": (lambda f: ["eval", "--limit", "0", *_inputs(f)], ["--limit"]),
    "onnxruntime without model": (lambda f: ["eval", "--backend", "onnxruntime", "--data", f["data"]],
                                  ["--model FILE.onnx"]),
    "onnxruntime missing file": (lambda f: ["eval", "--backend", "onnxruntime", "--model", f["root"] / "no.onnx"],
                                 ["no.onnx", "does not exist"]),
    "onnxruntime with method": (lambda f: ["eval", "--backend", "onnxruntime", "--model", f["checkpoint"],
                                           "--method", "minmax"], ["drop --method"]),
    "onnxruntime not onnx": (lambda f: ["eval", "--backend", "onnxruntime", "--model", f["checkpoint"]],
                             ["onnxruntime cannot load"]),
    "integer runtime, fractional zero point": (lambda f: ["eval", "--method", "repq-vit", *_inputs(f), "--backend",
                                                          "integer"],
                                               ["integer runtime", "fractional zero point", "--deploy onnxruntime"]),
    "export missing dir": (lambda f: ["export", f["root"] / "nope", "--output", f["root"] / "x.onnx"],
                           ["nope", "does not exist"]),
    "export bad opset": (lambda f: ["export", f["root"], "--output", "x.onnx", "--opset", "11"], ["--opset"]),
    "negative seed": (lambda f: ["eval", *_inputs(f), "--seed", "-1"], ["--seed", "from 0 to"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(cli, files, case):
    make_args, keywords = BAD_INPUTS[case]
    code, _, err = cli(*make_args(files))
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vitq: error: ")
    for word in keywords:
        assert word in lines[0]


def test_quantized_conflicting_method_is_an_error(cli, files, tmp_path):
    out_dir = tmp_path / "q"
    assert cli("quantize", "--method", "float", *_inputs(files), "--output", out_dir)[0] == 0
    code, _, err = cli("eval", "--quantized", out_dir, "--method", "minmax", "--data", files["data"])
    assert code == 2 and "--method minmax (saved: float)" in err


def test_help_and_version(cli):
    code, out, _ = cli("--help")
    assert code == 0 and "inspect" in out and "compare" in out and "export" in out
    code, out, _ = cli("eval", "--help")
    assert code == 0 and "--quantized" in out and "--sqnr" in out
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("vitq ")


# ---------------------------------------------------------------- real assets


def _real_assets_present() -> bool:
    return (assets_dir() / DEIT_TINY_CHECKPOINT).is_file() and (assets_dir() / IMAGENET_SAMPLE).is_dir()


@pytest.mark.integration
@pytest.mark.skipif(not _real_assets_present(), reason="real assets ($VITQ_ASSETS) not available")
def test_real_deit_tiny_float_accuracy(cli, tmp_path):
    path = tmp_path / "float.json"
    code, out, err = cli("eval", "--method", "float", "--limit", "100", "--no-progress", "--json", path)
    assert code == 0, err
    result = json.loads(path.read_text())
    assert result["n_images"] == 100
    assert result["top1"] > 70
    assert result["top5"] >= result["top1"]
    assert abs(result["float_size_mb"] - 22.87) < 0.1


def test_quantize_no_pack_keeps_float_weights(cli, files, tmp_path):
    code, out, err = cli("quantize", "--method", "minmax", *_inputs(files), "--output", tmp_path / "u", "--no-pack")
    assert code == 0, err
    assert read_header(tmp_path / "u" / "model.safetensors")["packed"] == {}


def test_quantize_with_reconstruction_saves_the_reconstructed_model(cli, files, tmp_path):
    """--recon settings reach the config (saved in the file), the reconstruction runs after calibration, resumes
    from --recon-checkpoint, and the reloaded model is the reconstructed one; bad settings are named."""
    common = ["--method", "minmax", "--w-bits", "4", "--a-bits", "4", *_inputs(files), "--recon-checkpoint",
              tmp_path / "ckpt", "--recon", "iterations=2", "--recon", "batch_size=2"]
    code, _, err = cli("quantize", *common, "--output", tmp_path / "q")
    assert code == 0, err
    info = json.loads((tmp_path / "q" / "quantize.json").read_text())
    assert info["config"]["reconstruct"]["iterations"] == 2 and info["config"]["reconstruct"]["drop_prob"] == 0.0
    assert (tmp_path / "ckpt" / "reconstruction.safetensors").is_file()
    code, _, err = cli("quantize", *common, "--output", tmp_path / "again")  # resumes: every block is done
    assert code == 0, err
    first = vitq.load(tmp_path / "q" / "model.safetensors").model.state_dict()
    again = vitq.load(tmp_path / "again" / "model.safetensors").model.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    code, _, err = cli("quantize", *common[:-6], "--output", tmp_path / "plain")  # no reconstruction
    assert code == 0, err
    plain = vitq.load(tmp_path / "plain" / "model.safetensors").model.state_dict()
    assert not torch.equal(plain["blocks.0.mlp.fc1.weight"], first["blocks.0.mlp.fc1.weight"])
    code, _, err = cli("quantize", "--method", "minmax", *_inputs(files), "--recon", "drop_prob=1.5",
                       "--output", tmp_path / "bad")
    assert code != 0 and "drop_prob" in err



def test_methods_lists_every_method_with_its_paper_kind_and_options(cli):
    code, out, _ = cli("methods")
    assert code == 0
    blocks = {block.split(" ", 1)[0]: block for block in out.strip().split("\n\n")}
    assert sorted(blocks) == method_names()
    assert blocks["qdrop"].startswith("qdrop (reconstruction-based):")
    assert blocks["erq"].startswith("erq (calibration-only):")
    assert "ERQ: Error Reduction for Post-Training Quantization of Vision Transformers (Zhong et al., ICML 2024)" \
        in blocks["erq"]
    lam = next(line for line in blocks["erq"].splitlines() if line.split()[:1] == ["lam"])
    assert lam.split()[1:4] == ["float", ">=", "0"] and "2000.0" in lam
    assert "paper: none (a baseline)" in blocks["minmax"] and "options: none" in blocks["minmax"]
    code, out, _ = cli("methods", "gptq")
    assert code == 0 and out.startswith("gptq (calibration-only)") and "act_order" in out and "erq" not in out


@pytest.mark.parametrize("option, message", [
    ("lam=x", "method 'erq' option lam: Input should be a valid number (got 'x'); valid options: aqer, wqer, lam"),
    ("lam=Infinity", "method 'erq' option lam: Input should be a finite number"),
    ("lamda=3", "method 'erq' has no option(s) lamda; valid options: aqer, wqer, lam, lam_head"),
])
def test_bad_method_option_names_the_valid_ones(cli, files, option, message):
    code, _, err = cli("eval", "--method", "erq", "--option", option, *_inputs(files))
    assert code == 2 and err.startswith("vitq: error: ") and message in err and len(err.splitlines()) == 1
