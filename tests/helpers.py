"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

#: what :func:`random_timm_model` does to every BatchNorm (the generator continues after the parameters' noise)
BatchNormInit = Callable[[nn.modules.batchnorm._BatchNorm, torch.Generator], None]


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Spread the LayerNorm gains over ~2 decades so the per-channel scales of post-LayerNorm activations
    really differ (and a reparameterization really rescales), unlike timm's init (gain 1, bias 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen).mul(1.2).exp())
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
    return model


def random_test_vit() -> nn.Module:
    """timm's tiny ``test_vit`` (6 blocks, dim 64, 3 heads, 160 px), random-init with seed 0."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False).eval()


def random_timm_model(name: str | Callable[..., nn.Module], *, seed: int = 0, noise: float = 0.05,
                      batchnorm: BatchNormInit | None = None, **kwargs) -> nn.Module:
    """A random-init timm model (``torch.manual_seed(seed)``; ``name`` or a constructor taking ``kwargs``) in eval
    mode, every parameter nudged by ``noise``·N(0, 1) so zero- or constant-initialised biases, gates and tables take
    part, then ``batchnorm`` applied to each BatchNorm (same generator), timm's fused attention off."""
    import timm

    torch.manual_seed(seed)
    model = (timm.create_model(name, pretrained=False, **kwargs) if isinstance(name, str) else name(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
        for module in model.modules():
            if batchnorm is not None and isinstance(module, nn.modules.batchnorm._BatchNorm):
                batchnorm(module, gen)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


def random_batchnorm_statistics(mean: float, *, gains: bool = False) -> BatchNormInit:
    """A :data:`BatchNormInit`: running mean ``mean``·N(0, 1), running variance U(0.5, 1.5) and, with ``gains``,
    weights U(0.5, 1.5), so that BatchNorm folds are not near-identities."""

    def init(norm: nn.modules.batchnorm._BatchNorm, gen: torch.Generator) -> None:
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=gen) * mean)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
        if gains:
            norm.weight.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)

    return init


def seeded_randn(*shape: int, seed: int) -> torch.Tensor:
    """``torch.randn(shape)`` from its own generator seeded with ``seed``."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float((out - ref).abs().max() / ref.abs().max())


def count_calls(monkeypatch, module, names: list[str]) -> dict[str, int]:
    """Wrap the functions ``names`` of ``module`` so that each call is counted; returns the live counts."""
    calls = dict.fromkeys(names, 0)

    def counting(name: str):
        function = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    for name in names:
        monkeypatch.setattr(module, name, counting(name))
    return calls


def random_images(n: int, size: int = 160) -> torch.Tensor:
    """``n`` random images ``[n, 3, size, size]`` (seed 0)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def quantized_test_vit(method: str, w_bits: int, a_bits: int, reconstruct=None, **options):
    """timm's random-init ``test_vit`` (seed 0), 4 random 160 px images, and the model quantized with ``method``
    on the first two: ``(model, images, qmodel)``. ``reconstruct``: a :class:`~vitq.config.ReconConfig`."""
    import vitq

    model, images = random_test_vit(), random_images(4)
    config = vitq.QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits, calib_size=2, options=options,
                              reconstruct=reconstruct)
    return model, images, vitq.quantize(model, config, images[:2], progress=False)


def write_images(folder: Path, n: int) -> Path:
    """``n`` small noise JPEGs named ``<wnid>_x.JPEG`` (one class each) in ``folder``."""
    from PIL import Image

    from vitq.data import imagenet_wnids

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for wnid in imagenet_wnids()[:n]:
        pixels = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{wnid}_x.JPEG")
    return folder


def self_labelled_folder(root: Path, n: int, model_name: str = "test_vit") -> tuple[Path, Path]:
    """A random-init ``model_name`` checkpoint (seed 0) and ``n`` noise JPEGs in ``root``, each named after the
    class the float model predicts for it (so top-1 is 100 % for float, not trivially 0, and a difference in the
    quantized numbers shows): ``(checkpoint, image folder)``."""
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    from vitq.data import imagenet_wnids
    from vitq.experiment.runs import RunSpec
    from vitq.models.registry import create_model

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    checkpoint = root / f"{model_name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    data = root / "images"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8, generator=generator) for _ in range(n)]
    wnids = imagenet_wnids()
    for i, image in enumerate(pixels):  # named for a placeholder class first: the transform needs a file to read
        Image.fromarray(image.numpy()).save(data / f"{wnids[i]}_{i}.JPEG")
    float_model = create_model(model_name, checkpoint=checkpoint)
    cache = RunSpec(model_name, checkpoint, data, progress=False).image_cache(float_model)
    images, _ = cache.tensors(list(range(n)))
    with torch.no_grad():
        predicted = float_model(images).argmax(dim=1).tolist()
    for path, cls in zip(cache.file_names(range(n)), predicted, strict=True):
        index = path.split("_")[1]
        (data / path).rename(data / f"{wnids[cls]}_{index}")
    return checkpoint, data


def assert_close_to_fake_quant(qmodel, exported: torch.Tensor, images: torch.Tensor) -> None:
    """``exported`` (the logits of an exported ``qmodel`` on ``images``) computes the fake-quant model: same classes
    (a class may only differ on an image whose fake-quant top-2 margin is below that image's |exported −
    fake-quant|: random-init logits are near ties, and one code rounded the other way at a tie flips them), and
    |exported − fake-quant| well below |float − fake-quant| (the quantization error)."""
    with torch.no_grad():
        reference = qmodel(images)
        with qmodel.quantization_disabled():
            quantization_error = (qmodel(images) - reference).abs().mean()
    top2 = reference.topk(2, dim=1).values
    margin, deviation = top2[:, 0] - top2[:, 1], (exported - reference).abs().amax(1)
    flipped = exported.argmax(1) != reference.argmax(1)
    assert bool((margin[flipped] < deviation[flipped]).all()), (margin[flipped], deviation[flipped])
    assert (exported - reference).abs().mean() < 0.3 * quantization_error


def sqnr_to_float(qmodel, images: torch.Tensor) -> float:
    """The quantized model's output SQNR (dB) against the same model with every quantizer off."""
    with torch.no_grad():
        quantized = qmodel(images)
        with qmodel.quantization_disabled():
            floating = qmodel(images)
    return float(10 * torch.log10(floating.square().sum() / (quantized - floating).square().sum()))


def assert_saves_and_loads_bit_identically(name: str, tmp_path: Path) -> None:
    """Quantize the model ``name`` (W4A8 ``minmax``, 32 px random images), save, load: same name, same outputs."""
    import vitq
    from vitq.models.registry import create_model

    images = random_images(4, size=32)
    qmodel = vitq.quantize(create_model(name), vitq.QuantConfig(method="minmax", w_bits=4, a_bits=8, calib_size=4),
                           images, model_name=name, progress=False)
    loaded = vitq.load(vitq.save(qmodel, tmp_path / "q.safetensors"))
    assert loaded.model_name == name
    with torch.no_grad():
        assert torch.equal(loaded(images), qmodel(images))


def run_stages(qmodel, x: torch.Tensor) -> torch.Tensor:
    """``x`` through every stage of ``qmodel`` in order (what block-by-block calibration runs)."""
    for stage in qmodel.stages():
        x = stage.run(x)
    return x


@torch.no_grad()
def apply_random_folds(qmodel, pairs: list[tuple[str, str]], seed: int = 0) -> None:
    """Fold a random per-channel ratio in [0.5, 2) and shift (0.5·N(0, 1)) into every LayerNorm → Linear pair, as
    RepQ-ViT's reparameterization does; the float function must not change."""
    from vitq.methods.repq_vit.reparam import apply_fold

    gen = torch.Generator().manual_seed(seed)
    for norm, linear in pairs:
        channels = qmodel.model.get_submodule(norm).weight.numel()
        ratio = torch.rand(channels, generator=gen, dtype=torch.float64) * 1.5 + 0.5
        shift = torch.randn(channels, generator=gen, dtype=torch.float64) * 0.5
        apply_fold(qmodel.model.get_submodule(norm), qmodel.model.get_submodule(linear), ratio, shift)
