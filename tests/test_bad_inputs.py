"""Bad and hostile input, one table: every case is one ``vitq: error:`` line, a non-zero exit code, and nothing
written (the output folder of the case is left exactly as it was). The fixtures are built here from a random-init
``test_vit``: NaN/Inf checkpoints, saved models with edited headers and tensors, corrupt journals, reconstruction
checkpoints and ONNX metadata. Then the Python API's table, and interrupts and write errors in real processes."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import timm
import torch
from helpers import random_images, random_test_vit, write_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import vitq
from vitq.__main__ import load_cli, reraise_swallowed_interrupt
from vitq.cli import main
from vitq.errors import VitqError
from vitq.experiment.compare import JOURNAL_FILE, CompareSpec, Journal, compare_plan
from vitq.export.checkpoint import HEADER_KEY
from vitq.export.onnx import METADATA_KEY

MODEL, N_IMAGES, CALIB = "test_vit", 6, 2
SCALE = "blocks.0.mlp.fc1.weight_quantizer.scale"
PACKED = "blocks.0.mlp.fc1.weight"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    """A random ``test_vit`` checkpoint, 6 synthetic images, a saved W4A4 model (packed and not), its ONNX export."""
    root = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    checkpoint = root / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(MODEL).state_dict().items()}, str(checkpoint))
    paths = {"root": root, "checkpoint": checkpoint, "data": write_images(root / "images", N_IMAGES)}
    common = ["--model", MODEL, "--checkpoint", str(checkpoint), "--data", str(paths["data"]), "--calib-size",
              str(CALIB), "--no-progress", "--method", "minmax", "--w-bits", "4", "--a-bits", "4"]
    for name, extra in {"saved": [], "unpacked": ["--no-pack"]}.items():
        assert main(["quantize", *common, "--output", str(root / name), *extra]) == 0
        paths[name] = root / name
    paths["onnx"] = root / "model.onnx"
    assert main(["export", str(root / "saved"), "--output", str(paths["onnx"])]) == 0
    return paths


def _inputs(env, **given) -> list[str]:
    values = {"--model": MODEL, "--checkpoint": env["checkpoint"], "--data": env["data"], "--calib-size": CALIB,
              **given}
    return [str(a) for flag, value in values.items() for a in (flag, value)] + ["--no-progress"]


def _edited_state(env, out: Path, edit: Callable[[dict], None], name: str = "ckpt.safetensors") -> Path:
    """A copy of the float checkpoint with ``edit`` applied to its tensors."""
    state = load_file(str(env["checkpoint"]))
    edit(state)
    path = out.parent / name
    save_file(state, str(path))
    return path


def _edited_saved(env, out: Path, *, tensors: Callable[[dict], None] | None = None,
                  header: Callable[[dict], None] | None = None, source: str = "saved") -> Path:
    """A copy of a saved model folder whose ``model.safetensors`` has edited tensors and/or header."""
    folder = out.parent / "edited"
    shutil.copytree(env[source], folder)
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()[HEADER_KEY])
    state = load_file(str(path))
    if tensors:
        tensors(state)
    if header:
        header(meta)
    save_file(state, str(path), metadata={HEADER_KEY: json.dumps(meta)})
    return folder


def _edited_record(env, out: Path, edit: Callable[[dict], object]) -> Path:
    folder = out.parent / "edited"
    shutil.copytree(env["saved"], folder)
    record = json.loads((folder / "quantize.json").read_text())
    edited = edit(record)
    (folder / "quantize.json").write_text(edited if isinstance(edited, str) else json.dumps(record))
    return folder


def _edited_onnx(env, out: Path, metadata: str | None) -> Path:
    import onnx

    model = onnx.load(str(env["onnx"]))
    del model.metadata_props[:]
    if metadata is not None:
        onnx.helper.set_model_props(model, {METADATA_KEY: metadata})
    path = out.parent / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _onnx_header(env) -> dict:
    import onnx

    props = {p.key: p.value for p in onnx.load(str(env["onnx"])).metadata_props}
    return json.loads(props[METADATA_KEY])


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree[key]
    tree[last] = value


_RUN = {"method": "minmax", "setting": "W8A8", "seed": 0, "n_images": 4, "top1": 50.0, "top5": 75.0,
        "float_top1": 50.0, "calib_seconds": 1.0, "eval_seconds": 1.0, "size_mb": 0.1}


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    """``args(env, out)``: the command line (``out``: a fresh folder for the case's outputs, absent unless
    ``setup`` makes it); the exit code and fragments of the one-line message."""

    args: Callable[[dict, Path], list]
    words: tuple[str, ...]
    code: int = 2
    setup: Callable[[dict, Path], None] | None = field(default=None)


def _quantize(env, out, *extra, **given):
    return ["quantize", *_inputs(env, **given), "--output", out / "q", *extra]


def _eval_saved(folder, env, *extra):
    return ["eval", "--quantized", folder, "--data", env["data"], "--no-progress", *extra]


def _made(*names: str):
    """A setup that creates files (``name``) and non-empty folders (``name/``) in ``out`` before the command."""

    def setup(env, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            target = out / name
            if name.endswith("/"):
                target.mkdir(parents=True)
                (target / "keep.txt").write_text("old")
            else:
                target.write_text("old")

    return setup


def _written(name: str, data: bytes | None = None, copy_of: str | None = None):
    """A setup that writes ``data`` (or a copy of ``env[copy_of]``) to ``out / name``."""

    def setup(env, out: Path) -> None:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        if copy_of is not None:
            shutil.copy(env[copy_of], out / name)
        else:
            (out / name).write_bytes(data)

    return setup


def _val_folder(out: Path, labels: dict[str, str], numbers=(1, 2, 3, 4, 5, 6)) -> Path:
    """A flat folder of ``ILSVRC2012_val_<n>.JPEG`` noise images next to ``out`` holding the ``labels`` files
    (name: text); the folder when ``labels`` holds a file of the folder's own, else the first file given."""
    from PIL import Image

    folder = out.parent / "val"
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.new("RGB", (20, 20), (n * 30, 0, 0)).save(folder / f"ILSVRC2012_val_{n:08d}.JPEG")
    for name, text in labels.items():
        (folder / name).write_text(text)
    return folder


def _eval_val(env, out, labels: dict[str, str], numbers=(1, 2, 3, 4, 5, 6), given: str | None = None):
    """``vitq eval`` on a flat validation folder (:func:`_val_folder`), with ``--labels FOLDER/given``."""
    folder = _val_folder(out, labels, numbers)
    return ["eval", *_inputs(env, **{"--data": folder}), *(["--labels", folder / given] if given else [])]


def _written_now(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _nan_weight(state):
    state["blocks.1.attn.qkv.weight"][3, 5] = float("nan")


def _inf_weight(state):
    state["head.weight"][0, 0] = float("inf")


CASES: dict[str, Case] = {
    # ---- model and checkpoint
    "unknown model": Case(lambda e, o: ["eval", *_inputs(e, **{"--model": "test_vitt"})], ("unknown model",)),
    "bad pretrained tag": Case(lambda e, o: ["eval", *_inputs(e, **{"--model": "test_vit.nope"})],
                               ("unknown pretrained tag", "r160_in1k")),
    "NaN checkpoint weight": Case(lambda e, o: _quantize(e, o, **{"--checkpoint": _edited_state(e, o, _nan_weight)}),
                                  ("blocks.1.attn.qkv.weight", "NaN")),
    "Inf checkpoint weight": Case(lambda e, o: ["eval", *_inputs(e, **{"--checkpoint": _edited_state(
        e, o, _inf_weight)})], ("head.weight", "infinite")),
    "checkpoint of another size": Case(lambda e, o: ["eval", *_inputs(e, **{"--model": "test_vit2"})],
                                       ("does not match",)),
    "checkpoint not safetensors": Case(lambda e, o: ["eval", *_inputs(e, **{"--checkpoint": o / "w.pt"})],
                                       ("not a .safetensors file",), setup=_made("w.pt")),
    "checkpoint garbage": Case(lambda e, o: ["eval", *_inputs(e, **{"--checkpoint": o / "g.safetensors"})],
                               ("cannot read checkpoint",),
                               setup=_written("g.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")),
    # ---- data
    "missing data": Case(lambda e, o: ["eval", *_inputs(e, **{"--data": o / "none"})], ("does not exist",)),
    "calibration takes every image": Case(lambda e, o: ["eval", *_inputs(e, **{"--calib-size": N_IMAGES})],
                                          ("leaving none",)),
    "calibration larger than data": Case(lambda e, o: _quantize(e, o, **{"--calib-size": 99}), ("larger",)),
    # ---- ImageNet validation labels files
    "val folder without labels": Case(lambda e, o: _eval_val(e, o, {}), ("no labels file", "--labels")),
    "val labels of the devkit": Case(lambda e, o: _eval_val(e, o, {"ILSVRC2012_validation_ground_truth.txt": "1\n"},
                                                            given="ILSVRC2012_validation_ground_truth.txt"),
                                     ("devkit", "meta.mat")),
    "val folder with only the devkit's labels": Case(lambda e, o: _eval_val(
        e, o, {"ILSVRC2012_validation_ground_truth.txt": "1\n"}), ("devkit", "meta.mat")),
    "val label 1000": Case(lambda e, o: _eval_val(e, o, {"labels.txt": "0\n1\n2\n1000\n4\n5\n"}),
                           ("labels.txt line 4", "label 1000")),
    "val label not a number": Case(lambda e, o: _eval_val(e, o, {"labels.txt": "0\n1\n2\n3\nfour\n5\n"}),
                                   ("labels.txt line 5", "'four'")),
    "val labels too few": Case(lambda e, o: _eval_val(e, o, {"val_labels.txt": "0\n1\n"}),
                               ("val_labels.txt", "has 2 lines", "holds 6")),
    "val labels too many": Case(lambda e, o: _eval_val(e, o, {"labels.txt": "0\n" * 7}), ("has 7 lines",)),
    "val labels of a subset by line": Case(lambda e, o: _eval_val(e, o, {"labels.txt": "0\n1\n"}, numbers=(1, 5)),
                                           ("line 2", "for a subset")),
    "val csv unknown file": Case(lambda e, o: _eval_val(e, o, {"ground_truth.csv": "".join(
        f"ILSVRC2012_val_{n:08d},{n}\n" for n in (1, 2, 3, 4, 5, 6, 7))}), ("ground_truth.csv line 7",
                                                                            "not an image of the folder")),
    "val csv duplicate row": Case(lambda e, o: _eval_val(e, o, {"ground_truth.csv": "".join(
        f"ILSVRC2012_val_{n:08d},{n}\n" for n in (1, 2, 3, 3, 4, 5, 6))}), ("line 4", "labelled again")),
    "val csv missing row": Case(lambda e, o: _eval_val(e, o, {"ground_truth.csv": "".join(
        f"ILSVRC2012_val_{n:08d},{n}\n" for n in (1, 2, 3, 5, 6))}), ("no label for 1", "ILSVRC2012_val_00000004")),
    "val csv bad wnid": Case(lambda e, o: _eval_val(e, o, {"ground_truth.csv": "".join(
        f"ILSVRC2012_val_{n:08d},n0144076{n}\n" for n in (1, 2, 3, 4, 5, 6))}), ("line 1", "not an ImageNet-1k wnid")),
    "val kaggle bad row": Case(lambda e, o: _eval_val(e, o, {"LOC_val_solution.csv": "ImageId,PredictionString\n"
                                                             "ILSVRC2012_val_00000001\n"}),
                               ("LOC_val_solution.csv line 2", "expected 'file,label'")),
    "val several labels files": Case(lambda e, o: _eval_val(e, o, {"labels.txt": "0\n", "ground_truth.csv": "x,0\n"}),
                                     ("several labels files", "--labels")),
    "val labels file missing": Case(lambda e, o: _eval_val(e, o, {}, given="nope.txt"), ("nope.txt", "does not exist")),
    "val labels not UTF-8": Case(lambda e, o: ["eval", *_inputs(e, **{"--data": _val_folder(o, {})}), "--labels",
                                               _written_now(o.parent / "l.txt", b"\xff\xfe0\n")], ("not UTF-8",)),
    "labels for a folder named by class": Case(lambda e, o: ["eval", *_inputs(e), "--labels", _written_now(
        o.parent / "l.txt", b"0\n")], ("applies to a flat folder of ILSVRC2012_val_",)),
    # ---- bits, methods, options, seeds
    "w bits 9": Case(lambda e, o: _quantize(e, o, "--w-bits", "9"), ("w_bits",)),
    "a bits 1": Case(lambda e, o: _quantize(e, o, "--a-bits", "1"), ("a_bits",)),
    "outliers top_k 0": Case(lambda e, o: _quantize(e, o, "--outliers", "top_k=0"), ("top_k",)),
    "outliers with gptq": Case(lambda e, o: _quantize(e, o, "--method", "gptq", "--outliers", "top_k=2"),
                               ("'gptq' does not take outlier splitting",)),
    "a bits 12": Case(lambda e, o: _quantize(e, o, "--a-bits", "12"), ("or 16 for weight-only",)),
    "w bits not a number": Case(lambda e, o: _quantize(e, o, "--w-bits", "four"), ("--w-bits",)),
    "unknown method": Case(lambda e, o: _quantize(e, o, "--method", "nope"), ("--method",)),
    "option of the wrong type": Case(lambda e, o: _quantize(e, o, "--method", "noisyquant", "--option",
                                                            "amplitudes=x"), ("amplitudes", "list")),
    "infinite option": Case(lambda e, o: _quantize(e, o, "--method", "gptq", "--option", "damp=Infinity"),
                            ("damp", "finite")),
    "NaN in an option list": Case(lambda e, o: _quantize(e, o, "--method", "noisyquant", "--option",
                                                         "amplitudes=[0.5,NaN]"), ("amplitudes", "finite")),
    "unknown option": Case(lambda e, o: _quantize(e, o, "--method", "minmax", "--option", "foo=1"), ("no option",)),
    "option without value": Case(lambda e, o: _quantize(e, o, "--option", "=1"), ("KEY=VALUE",)),
    "NaN reconstruction beta": Case(lambda e, o: _quantize(e, o, "--recon", "beta=[NaN,2]"), ("beta", "finite")),
    "unknown reconstruction setting": Case(lambda e, o: _quantize(e, o, "--recon", "iters=3"), ("iters",)),
    "zero reconstruction iterations": Case(lambda e, o: _quantize(e, o, "--recon", "iterations=0"),
                                           ("iterations",)),
    "seed 2^64": Case(lambda e, o: _quantize(e, o, "--seed", str(2**64)), ("--seed", "from 0 to")),
    "seed not a number": Case(lambda e, o: _quantize(e, o, "--seed", "1e3"), ("--seed",)),
    "unicode digit seed": Case(lambda e, o: _quantize(e, o, "--seed", "²"), ("--seed",)),
    "threads 0": Case(lambda e, o: _quantize(e, o, "--threads", "0"), ("--threads",)),
    # ---- overrides
    "override matching nothing": Case(lambda e, o: _quantize(e, o, "--override", "blokcs.*=float"),
                                      ("blokcs.*", "matches no quantizer slot")),
    "override without value": Case(lambda e, o: _quantize(e, o, "--override", "head="), ("PATTERN=",)),
    "override unknown kind": Case(lambda e, o: _quantize(e, o, "--override", "head=bogus:4"),
                                  ("unknown quantizer kind",)),
    "override bits 12": Case(lambda e, o: _quantize(e, o, "--override", "head=12"), ("bits",)),
    # ---- outputs, checked before any work
    "output is a file": Case(lambda e, o: _quantize(e, o), ("is a file",), setup=_made("q")),
    "output folder not empty": Case(lambda e, o: _quantize(e, o), ("--overwrite",), setup=_made("q/")),
    "output under a file": Case(lambda e, o: ["quantize", *_inputs(e), "--output", o / "f" / "q"],
                                ("is not a folder",), setup=_made("f")),
    "quantize json is a folder": Case(lambda e, o: _quantize(e, o, "--json", o / "j"), ("--json", "is a folder"),
                                      setup=_made("j/")),
    "quantize json exists": Case(lambda e, o: _quantize(e, o, "--json", o / "r.json"), ("--overwrite",),
                                 setup=_made("r.json")),
    "eval json is a folder": Case(lambda e, o: ["eval", *_inputs(e), "--json", o / "j"], ("is a folder",),
                                  setup=_made("j/")),
    "eval json exists": Case(lambda e, o: ["eval", *_inputs(e), "--json", o / "r.json"], ("--overwrite",),
                             setup=_made("r.json")),
    "export output exists": Case(lambda e, o: ["export", e["saved"], "--output", o / "m.onnx"], ("--overwrite",),
                                 setup=_made("m.onnx")),
    "export output is a folder": Case(lambda e, o: ["export", e["saved"], "--output", o / "m.onnx"],
                                      ("is a folder",), setup=_made("m.onnx/")),
    "compare out-dir is a file": Case(lambda e, o: ["compare", *_inputs(e), "--out-dir", o / "c"], ("is a file",),
                                      setup=_made("c")),
    "compare over a journal": Case(lambda e, o: ["compare", *_inputs(e), "--out-dir", o], ("--resume", "--overwrite"),
                                   setup=_written(JOURNAL_FILE, b"{}\n")),
    # ---- compare lists
    "empty methods": Case(lambda e, o: ["compare", "--methods", "", *_inputs(e), "--out-dir", o],
                          ("--methods is empty",)),
    "empty bits": Case(lambda e, o: ["compare", "--bits", " , ", *_inputs(e), "--out-dir", o], ("--bits is empty",)),
    "empty seeds": Case(lambda e, o: ["compare", "--seeds", ",", *_inputs(e), "--out-dir", o], ("--seeds is empty",)),
    "negative compare seed": Case(lambda e, o: ["compare", "--seeds", "0,-1", *_inputs(e), "--out-dir", o],
                                  ("seed '-1'",)),
    # ---- journals
    "journal not UTF-8": Case(lambda e, o: ["compare", *_inputs(e), "--out-dir", o, "--resume"], ("not UTF-8",),
                              setup=_written(JOURNAL_FILE, b"\xff\xfe{}\n")),
    "journal line not JSON": Case(lambda e, o: ["compare", *_inputs(e), "--out-dir", o, "--resume"], ("line 1",),
                                  setup=_written(JOURNAL_FILE, b"{not json}\n{}\n")),
    "journal line of wrong types": Case(
        lambda e, o: ["compare", *_inputs(e), "--out-dir", o, "--resume"], ("line 1", "top1"),
        setup=_written(JOURNAL_FILE, json.dumps({"key": "{}", "run": {**_RUN, "top1": "high"}}).encode() + b"\n")),
    "journal line with a missing field": Case(
        lambda e, o: ["compare", *_inputs(e), "--out-dir", o, "--resume"], ("line 1", "key"),
        setup=_written(JOURNAL_FILE, json.dumps({"run": _RUN}).encode() + b"\n")),
    # ---- saved models: folder and record
    "quantized folder missing": Case(lambda e, o: _eval_saved(o / "none", e), ("does not exist",)),
    "quantized folder without model": Case(lambda e, o: _eval_saved(o, e), ("quantized model not found",),
                                           setup=_made("quantize.json")),
    "saved model, another seed": Case(lambda e, o: _eval_saved(e["saved"], e, "--seed", "1"),
                                      ("--seed 1 (saved: 0)", "calibration images")),
    "saved model, another calib size": Case(lambda e, o: _eval_saved(e["saved"], e, "--calib-size", "3"),
                                            ("--calib-size 3 (saved: 2)",)),
    "record not JSON": Case(lambda e, o: _eval_saved(_edited_record(e, o, lambda r: "{"), e),
                            ("not a vitq quantize record",)),
    "record of wrong types": Case(lambda e, o: _eval_saved(_edited_record(
        e, o, lambda r: r.update(calibration_images="all")), e), ("calibration_images",)),
    "record lists other images": Case(lambda e, o: _eval_saved(_edited_record(
        e, o, lambda r: r["calibration_images"].pop()), e), ("lists 1 calibration images",)),
    # ---- saved models: header and tensors
    "plain safetensors as a saved model": Case(lambda e, o: _eval_saved(o, e), ("not a vitq quantized model",),
                                               setup=_written("model.safetensors", copy_of="checkpoint")),
    "future format version": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: h.update(format_version=99)), e), ("unsupported format",)),
    "spec bits over packed codes": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, "quantizers/blocks.0.mlp.fc1.weight_quantizer/bits", 3)), e),
        (PACKED, "3-bit")),
    "absurd packed q_min": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, f"packed/{PACKED}/q_min", -(10**9))), e), (PACKED, "codes from")),
    "unknown packed dtype": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, f"packed/{PACKED}/dtype", "Tensor")), e), (PACKED, "'Tensor'")),
    "packed shape edited": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, f"packed/{PACKED}/shape", [64, 192])), e), (PACKED, "shape")),
    "packed codes of another dtype": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update({PACKED + ".packed": s[PACKED + ".packed"].to(torch.int16)})), e),
        (PACKED + ".packed", "dtype")),
    "packed codes cut short": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update({PACKED + ".packed": s[PACKED + ".packed"][:-1].clone()})), e),
        (PACKED + ".packed", "shape")),
    "scale shrunk": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update({SCALE: s[SCALE][:-1].clone()})), e), (SCALE, "shape")),
    "scale transposed": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update({SCALE: s[SCALE][None, :].clone()})), e), (SCALE, "shape")),
    "scale as float16": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update({SCALE: s[SCALE].half()})), e), (SCALE, "dtype")),
    "zero scale": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s[SCALE].__setitem__(0, 0.0)), e), (SCALE, "positive")),
    "negative scale": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s[SCALE].__setitem__(4, -1.0)), e), (SCALE, "positive")),
    "NaN scale": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s[SCALE].__setitem__(2, float("nan"))), e), (SCALE, "NaN")),
    "NaN weight in an unpacked model": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, source="unpacked", tensors=_nan_weight), e), ("blocks.1.attn.qkv.weight", "NaN")),
    "unexpected tensor": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.update(extra=torch.zeros(3))), e), ("unexpected tensor", "extra")),
    "missing tensor": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, tensors=lambda s: s.pop("blocks.2.norm1.weight")), e), ("missing tensor", "blocks.2.norm1.weight")),
    "another family": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: h.update(family="swin")), e), ("saved as a swin model",)),
    "a large architecture": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: h.update(model_name="vit_giant_patch14_224")), e), ("does not match",)),
    "header model unknown": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: h.update(model_name="no_such_vit")), e), ("unknown model",)),
    "header config invalid": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, "config/w_bits", 99)), e), ("w_bits",)),
    "header spec with a bad option": Case(lambda e, o: _eval_saved(_edited_saved(
        e, o, header=lambda h: _set(h, "quantizers/head.weight_quantizer/granularity", "pixel")), e),
        ("granularity",)),
    "export of an edited model": Case(lambda e, o: ["export", _edited_saved(
        e, o, tensors=lambda s: s[SCALE].__setitem__(0, -2.0)), "--output", o / "m.onnx"], ("positive",)),
    # ---- ONNX metadata
    "onnx without vitq metadata": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model",
                                                     _edited_onnx(e, o, None), "--data", e["data"]],
                                       ("no vitq metadata",)),
    "onnx metadata not JSON": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model",
                                                 _edited_onnx(e, o, "{oops"), "--data", e["data"]],
                                   ("corrupt vitq metadata",)),
    "onnx metadata unknown model": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model", _edited_onnx(
        e, o, json.dumps({**_onnx_header(e), "model_name": "no_such_vit"})), "--data", e["data"]],
        ("corrupt vitq metadata", "unknown model")),
    "onnx metadata bad config": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model", _edited_onnx(
        e, o, json.dumps({**_onnx_header(e), "config": {"w_bits": "eight"}})), "--data", e["data"]],
        ("corrupt vitq metadata", "w_bits")),
    "onnx metadata points of wrong types": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model",
                                                              _edited_onnx(e, o, json.dumps(
                                                                  {**_onnx_header(e), "points": [{"slot": 3}]})),
                                                              "--data", e["data"]], ("corrupt vitq metadata",
                                                                                     "points")),
    "onnx with another seed": Case(lambda e, o: ["eval", "--backend", "onnxruntime", "--model", e["onnx"],
                                                 "--data", e["data"], "--seed", "4"], ("--seed 4 (saved: 0)",)),
    # ---- OpenVINO
    "openvino eval without a model": Case(lambda e, o: ["eval", "--backend", "openvino", "--data", e["data"]],
                                          ("--backend openvino needs --model DIR",)),
    "openvino eval with --deploy": Case(lambda e, o: ["eval", "--backend", "openvino", "--model", o / "ir", "--deploy",
                                                      "openvino", "--data", e["data"]], ("drop", "--deploy")),
    "openvino model missing": Case(lambda e, o: ["eval", "--backend", "openvino", "--model", o / "ir", "--data",
                                                 e["data"]], ("out/ir does not exist",)),
    "openvino model is an ONNX file": Case(lambda e, o: ["eval", "--backend", "openvino", "--model", e["onnx"],
                                                         "--data", e["data"]], ("not an OpenVINO IR",)),
    "sensitivity of the float model": Case(lambda e, o: ["sensitivity", *_inputs(e), "--method", "float", "--out-dir",
                                                         o / "s"], ("--method float quantizes nothing",)),
    "sensitivity out-dir is a file": Case(lambda e, o: ["sensitivity", *_inputs(e), "--out-dir", o / "s"],
                                          ("is a file",), setup=_made("s")),
    "onnxruntime export onto a folder": Case(lambda e, o: ["export", e["saved"], "--format", "onnxruntime",
                                                           "--output", o / "m.onnx"], ("is a folder",),
                                             setup=_made("m.onnx/")),
    "packed weights in plain ONNX": Case(lambda e, o: ["export", e["saved"], "--packed-weights", "--output",
                                                       o / "m.onnx"], ("need --format onnxruntime",)),
    "nbits accuracy without packed weights": Case(lambda e, o: ["export", e["saved"], "--format", "onnxruntime",
                                                                "--nbits-accuracy", "int8", "--output", o / "m.onnx"],
                                                  ("--nbits-accuracy needs --packed-weights",)),
    "openvino export onto a file": Case(lambda e, o: ["export", e["saved"], "--format", "openvino", "--output",
                                                      o / "ir"], ("ir",), setup=_made("ir")),
    "symmetric override of a log quantizer": Case(lambda e, o: _quantize(e, o, "--method", "repq-vit", "--override",
                                                                         "*attn.softmax=symmetric"),
                                                  ("'log_sqrt2' has no symmetric form",)),
    # ---- reconstruction checkpoints
    "reconstruction checkpoint is a file": Case(
        lambda e, o: _quantize(e, o, "--recon", "iterations=1", "--recon-checkpoint", o / "rc"), ("is a file",),
        setup=_made("rc")),
    "corrupt reconstruction checkpoint": Case(
        lambda e, o: _quantize(e, o, "--recon", "iterations=1", "--recon-checkpoint", o / "rc"), ("unreadable",),
        setup=_written("rc/reconstruction.safetensors", b"garbage")),
}


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_the_table_is_large():
    assert len(CASES) + len(API_CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(env, tmp_path, capsys, name):
    case = CASES[name]
    out = tmp_path / "out"
    if case.setup is not None:
        case.setup(env, out)
    args = case.args(env, out)  # may build a bad fixture next to ``out``
    before = _snapshot(out)
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("vitq: error: "), err
    for word in case.words:
        assert word in lines[0], lines[0]
    assert _snapshot(out) == before  # nothing written, nothing changed
    assert not [p for p in tmp_path.rglob("*partial*")]


# ---------------------------------------------------------------- runs correctly


def test_compare_deduplicates_parsed_values():
    plan, settings = compare_plan(CompareSpec(methods="minmax,minmax[]", bits="W8A8,w8a8,W4A4"))
    assert [variant.label for variant, _ in plan] == ["minmax"] and settings == ["W8A8", "W4A4"]
    assert [bits for _, bits in plan] == [[(8, 8), (4, 4)]]


def test_compare_runs_each_seed_once(env, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", "--methods", "minmax", "--bits", "W8A8", "--seeds", "0,00", *_inputs(env),
                 "--out-dir", str(out)]) == 0
    lines = (out / JOURNAL_FILE).read_text().splitlines()
    assert len(lines) == 2  # float and minmax, once each
    capsys.readouterr()


def test_journal_drops_a_torn_last_line(tmp_path, capsys):
    good = json.dumps({"key": json.dumps({"label": "minmax"}), "run": _RUN})
    path = tmp_path / JOURNAL_FILE
    path.write_text(good + "\n" + good[:30])
    journal = Journal(path, resume=True)
    assert len(journal.done) == 1
    assert path.read_text() == good + "\n"
    assert "cut-off last line" in capsys.readouterr().err


def test_overwrite_replaces_an_output_folder_whole(env, tmp_path, capsys):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(["quantize", *_inputs(env), "--method", "minmax", "--output", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quantize.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    capsys.readouterr()


def test_eval_quantized_never_uses_calibration_images(env, tmp_path, capsys):
    path = tmp_path / "e.json"
    assert main(["eval", "--quantized", str(env["saved"]), "--data", str(env["data"]), "--no-progress",
                 "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["n_images"] == N_IMAGES - CALIB and record["calib_size"] == CALIB
    # a folder holding copies of the calibration images: they are left out by name
    mixed = write_images(tmp_path / "mixed", N_IMAGES)
    saved = json.loads((env["saved"] / "quantize.json").read_text())
    calibration = {image["file"] for image in saved["calibration_images"]}
    next(p for p in sorted(mixed.iterdir()) if p.name not in calibration).unlink()  # another folder, 5 images
    assert main(["eval", "--quantized", str(env["saved"]), "--data", str(mixed), "--no-progress", "--json",
                 str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n_images"] == N_IMAGES - 1 - CALIB
    capsys.readouterr()


def test_internal_errors_are_one_line_and_exit_1(env, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr("vitq.experiment.runs.quantize", broken)
    code = main(["quantize", *_inputs(env), "--output", str(tmp_path / "q")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1
    assert "internal error RuntimeError: something broke" in lines[0] and "report" in lines[0]
    assert not (tmp_path / "q").exists()


def test_ctrl_c_is_one_line_and_exit_130(env, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)  # in the middle of writing the model
    code = main(["quantize", *_inputs(env), "--method", "minmax", "--output", str(tmp_path / "q")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("vitq: interrupted")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the Python API


def _model():
    return random_test_vit()


def _strict_vit():
    """A tiny ViT that insists on its image size (like DeiT), unlike timm's test_vit."""
    return timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=10).eval()


API_CASES: dict[str, tuple[Callable[[], object], str]] = {
    "empty calibration tensor": (lambda: vitq.quantize(_model(), vitq.QuantConfig(), random_images(0),
                                                       progress=False), "empty"),
    "one channel": (lambda: vitq.quantize(_model(), vitq.QuantConfig(), random_images(2)[:, :1], progress=False),
                    "[N, 3, H, W]"),
    "images without a batch": (lambda: vitq.quantize(_model(), vitq.QuantConfig(), random_images(1)[0],
                                                     progress=False), "[N, 3, H, W]"),
    "integer images": (lambda: vitq.quantize(_model(), vitq.QuantConfig(), torch.zeros(2, 3, 160, 160,
                                                                                      dtype=torch.uint8),
                                             progress=False), "float"),
    "wrong image size": (lambda: vitq.quantize(_strict_vit(), vitq.QuantConfig(), random_images(2, 96),
                                               model_name="vit_tiny_patch16_224", progress=False), "224x224"),
    "NaN calibration image": (lambda: vitq.quantize(_model(), vitq.QuantConfig(),
                                                    random_images(2).index_fill_(2, torch.tensor([3]), float("nan")),
                                                    progress=False), "NaN"),
    "NaN model weight": (lambda: vitq.quantize(_nan_model(), vitq.QuantConfig(method="minmax"), random_images(2),
                                               progress=False), "NaN"),
    "unmatched override": (lambda: vitq.prepare(_model(), vitq.QuantConfig(overrides=[
        vitq.PointOverride(pattern="head2")])), "matches no quantizer slot"),
    "labels of the wrong length": (lambda: vitq.evaluate(_model(), (random_images(3), torch.zeros(2,
                                                                                                 dtype=torch.long)),
                                                         progress=False), "3 class indices"),
    "labels out of range": (lambda: vitq.evaluate(_model(), (random_images(2), torch.tensor([0, 1000])),
                                                  progress=False), "[0, 1000)"),
    "float labels": (lambda: vitq.evaluate(_model(), (random_images(2), torch.zeros(2)), progress=False),
                     "integer"),
    "a model with NaN logits": (lambda: vitq.evaluate(_nan_model(), (random_images(2), torch.zeros(2,
                                                                                                  dtype=torch.long)),
                                                      progress=False), "NaN or infinite logits"),
}


def _nan_model():
    model = _model()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("name", list(API_CASES))
def test_bad_api_input(name):
    call, fragment = API_CASES[name]
    with pytest.raises(VitqError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_float64_calibration_images_are_cast():
    images = random_images(2).double()
    qmodel = vitq.quantize(_model(), vitq.QuantConfig(method="minmax"), images, progress=False)
    expected = vitq.quantize(_model(), vitq.QuantConfig(method="minmax"), images.float(), progress=False)
    assert torch.equal(qmodel(images.float()), expected(images.float()))


# ---------------------------------------------------------------- real processes: interrupts, write errors


def _quantize_command(env, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vitq", "quantize", *_inputs(env), "--method", "minmax", "--w-bits", "4",
            "--a-bits", "4", "--output", str(out), "--threads", "1", *extra]


def _absent_or_complete(out: Path) -> bool:
    """True when ``out`` is a complete, loadable saved model; False when it is absent; fails otherwise."""
    if not out.exists():
        return False
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "quantize.json"]
    vitq.load(out / "model.safetensors")
    json.loads((out / "quantize.json").read_text())
    return True


#: after the first progress output (the model is loaded): seconds to wait before SIGINT; None = while loading
MOMENTS = (None, 0.0, 0.3, 0.8, 1.5, 2.5, 4.0, 8.0)


@contextlib.contextmanager
def default_sigint():
    """Python's own SIGINT handler for the duration: an earlier in-process CLI run leaves SIGINT ignored, and a
    runner started in the background (``cmd &``) ignores it from the start."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _swallowed_interrupt():
    return types.SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(), exc_traceback=None,
                                 err_msg="Exception ignored in", object=None)


def test_an_interrupt_swallowed_in_another_thread_is_raised_again_in_the_main_thread():
    with default_sigint(), pytest.raises(KeyboardInterrupt):
        worker = threading.Thread(target=reraise_swallowed_interrupt, args=(_swallowed_interrupt(),))
        worker.start()
        worker.join()
        for _ in range(1000):  # the interrupt arrives at the main thread's next signal check
            time.sleep(0.001)


def test_an_interrupt_swallowed_in_the_main_thread_while_loading_counts(monkeypatch):
    """In the main thread the hook cannot raise (its own exception would only be reported): it records the
    interrupt, and the loading counts as interrupted although the import went on."""
    def import_module(name):
        reraise_swallowed_interrupt(_swallowed_interrupt())
        return types.SimpleNamespace(main=lambda: 0)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with default_sigint():
        assert load_cli() is None


def _import_interrupted_then_failing(name):
    """A stand-in for ``importlib.import_module``: SIGINT arrives mid-import and a library catches it; then the
    import fails with another error, as a half-initialised module makes a later import fail."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            time.sleep(0.001)
    except KeyboardInterrupt:
        raise AttributeError("partially initialized module 'numpy'") from None
    return types.SimpleNamespace(main=lambda: 0)


def test_an_interrupt_while_loading_counts_whatever_the_import_raises(monkeypatch):
    monkeypatch.setattr(importlib, "import_module", _import_interrupted_then_failing)
    with default_sigint():
        assert load_cli() is None
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_an_import_error_without_an_interrupt_propagates(monkeypatch):
    def broken(name):
        raise AttributeError("a real bug")

    monkeypatch.setattr(importlib, "import_module", broken)
    with default_sigint(), pytest.raises(AttributeError, match="a real bug"):
        load_cli()
    with default_sigint():  # the real loader gives the command line
        monkeypatch.undo()
        assert load_cli() is main


def _interrupt_quantize_at(env, out: Path, moment: float | None) -> tuple[int, str]:
    """Run ``vitq quantize`` into ``out`` and send it SIGINT ``moment`` seconds after its first progress bar
    (``None``: one second after the start, while the libraries load); its exit code and stderr."""
    command = [c for c in _quantize_command(env, out, "--recon", "iterations=30") if c != "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if moment is None:
        time.sleep(1.0)
        head = b""
    else:
        head = process.stderr.read(1)  # blocks until the first progress bar
        time.sleep(moment)
    process.send_signal(signal.SIGINT)
    err = (head + process.communicate(timeout=300)[1]).decode()
    return process.returncode, err


def test_sigint_leaves_the_output_absent_or_complete(env, tmp_path):
    """SIGINT while the libraries load, then at moments spread over the work (images, calibration, a short
    reconstruction of ~3 s, saving, after saving): exit 130 with one ``vitq: interrupted`` line and no output,
    or exit 0 and a complete output. The progress bars (stderr) mark the start of the work. Two runs at a time
    (one per core of a 2-core machine)."""
    # the children would inherit an ignored SIGINT; a Python handler is reset to the default action by exec
    with default_sigint(), ThreadPoolExecutor(max_workers=2) as pool:
        runs = list(pool.map(lambda item: _interrupt_quantize_at(env, tmp_path / f"at{item[0]}", item[1]),
                             enumerate(MOMENTS)))
    for number, (code, err) in enumerate(runs):
        assert code in (0, 130), err
        assert "Traceback" not in err, err
        complete = _absent_or_complete(tmp_path / f"at{number}")
        messages = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("vitq:")]
        if code == 130:
            assert len(messages) == 1 and messages[0].startswith("vitq: interrupted"), err
        else:
            assert complete and not messages, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary siblings left
    codes = [code for code, _ in runs]
    assert codes.count(130) >= 4, codes  # loading and the first moments of the work are always interrupted


def _limit_file_size(limit: int) -> Callable[[], None]:
    def limit_in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs POSIX file-size limits")
def test_write_error_is_one_line_and_leaves_nothing(env, tmp_path):
    out = tmp_path / "q"
    # --workers 0: loader worker processes hand batches over in shared-memory files, which the limit caps too
    result = subprocess.run(_quantize_command(env, out, "--workers", "0"), capture_output=True, text=True,
                            preexec_fn=_limit_file_size(100_000), env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("vitq: error: ") and "File too large" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []
