"""Devices: ``resolve_device``, the ``device=`` arguments of the API, ``--device`` on the command line, and (only
where torch sees a CUDA GPU) every method run on it."""

from __future__ import annotations

import pytest
import torch
from helpers import random_images, random_test_vit
from safetensors.torch import save_file

import vitq
from vitq.cli import main
from vitq.config import ReconConfig
from vitq.device import model_device, resolve_device
from vitq.errors import VitqError
from vitq.methods import method_class, method_names

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------ resolve_device
def test_resolve_device_cpu_and_auto(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_resolve_device_refuses_unknown_and_missing_cuda(monkeypatch):
    with pytest.raises(VitqError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(VitqError, match="unknown device"):
        resolve_device("cuda:x")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(VitqError, match="use --device cpu") as caught:
            resolve_device(name)
        assert "\n" not in str(caught.value)


def test_model_device():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no tensors at all


# ------------------------------------------------------------------ the Python API
@pytest.fixture(scope="module")
def model_and_images():
    return random_test_vit(), random_images(4)


def _config(method: str = "minmax") -> vitq.QuantConfig:
    return vitq.QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2)


def test_quantize_on_cpu_is_the_default(model_and_images, one_thread):
    model, images = model_and_images
    plain = vitq.quantize(model, _config(), images[:2], progress=False)
    on_cpu = vitq.quantize(model, _config(), images[:2], progress=False, device="cpu")
    assert model_device(on_cpu) == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(plain(images), on_cpu(images))
    assert plain.quant_specs() == on_cpu.quant_specs()


def test_prepare_takes_a_device(model_and_images):
    model, _ = model_and_images
    qmodel = vitq.prepare(model, _config(), device="cpu")
    assert all(t.device.type == "cpu" for t in [*qmodel.parameters(), *qmodel.buffers()])
    with pytest.raises(VitqError, match="unknown device"):
        vitq.prepare(model, _config(), device="gpu")


def test_load_and_create_model_take_a_device(model_and_images, tmp_path, one_thread):
    model, images = model_and_images
    qmodel = vitq.quantize(model, _config(), images[:2], progress=False)
    path = vitq.save(qmodel, tmp_path / "model.safetensors")
    loaded = vitq.load(path, device="cpu")
    assert model_device(loaded) == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    rebuilt = vitq.create_model("test_vit", checkpoint=float_path, device="cpu")
    assert model_device(rebuilt) == torch.device("cpu")
    with torch.no_grad():
        assert torch.equal(rebuilt(images[:1]), model(images[:1]))


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_api_refuses_cuda_without_it(model_and_images, tmp_path):
    model, images = model_and_images
    with pytest.raises(VitqError, match="use --device cpu"):
        vitq.quantize(model, _config(), images[:2], progress=False, device="cuda")
    qmodel = vitq.quantize(model, _config(), images[:2], progress=False)
    path = vitq.save(qmodel, tmp_path / "model.safetensors")
    with pytest.raises(VitqError, match="use --device cpu"):
        vitq.load(path, device="cuda")


# ------------------------------------------------------------------ the command line
@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["quantize", "eval", "compare", "inspect"])
def test_cli_device_cuda_without_cuda_is_one_line(command, tmp_path, capsys):
    extra = {"quantize": ["--output", str(tmp_path / "out")], "compare": ["--methods", "minmax"]}.get(command, [])
    code = main([command, "--device", "cuda", "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("vitq: error: ") and err.count("\n") == 1, err
    assert "cuda" in err
    assert not (tmp_path / "out").exists()


def test_cli_onnxruntime_refuses_an_explicit_cuda_device(tmp_path, capsys):
    code = main(["eval", "--backend", "onnxruntime", "--device", "cuda", "--model", str(tmp_path / "m.onnx")])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("vitq: error: ") and err.count("\n") == 1, err


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_on_cuda(method, model_and_images):
    """The device contract: on ``device="cuda"``, every parameter and buffer of the quantized model is on the GPU
    and its logits are finite (TF32 off: float32 products stay float32)."""
    model, images = model_and_images
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    recon = ReconConfig(iterations=2, batch_size=2) if method_class(method).reconstructs else None
    config = vitq.QuantConfig(method=method, w_bits=4, a_bits=4, calib_size=2, reconstruct=recon)
    qmodel = vitq.quantize(model, config, images[:2], progress=False, device="cuda")
    assert all(t.is_cuda for t in [*qmodel.parameters(), *qmodel.buffers()])
    with torch.no_grad():
        logits = qmodel(images.cuda())
    assert logits.is_cuda and bool(torch.isfinite(logits).all())
    assert model_device(model).type == "cpu"  # the input model is left where it was
