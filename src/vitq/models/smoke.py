"""Small random-initialised configs of every supported timm family, for smoke checks of an adapter and the methods
on it (the family tests, ``benchmarks/coverage.py``): few blocks and few tokens, so that every method calibrates
in seconds. Nothing is downloaded; random weights say nothing about accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vitq.checks import expected_image_size


@dataclass(frozen=True)
class SmokeConfig:
    """A timm model name, the keyword arguments that make it small, and one of its softmax points (``None``: the
    family has no softmax, e.g. EfficientViT MIT's ReLU linear attention)."""

    label: str
    timm_name: str
    kwargs: dict = field(default_factory=dict)
    softmax_point: str | None = "blocks.1.attn.softmax"
    #: measure the BatchNorm running statistics on random images, as training sets them: under timm's init
    #: (PyTorch's default conv init with unit running variances) some models' signal fades layer by layer, their
    #: logits hardly depend on the image and every attention map is uniform, so no quantizer's effect shows
    batchnorm_statistics: bool = False


#: method options that shrink the slowest searches for a smoke check (what they skip or shrink is family-agnostic)
SMOKE_OPTIONS: dict[str, dict] = {"adalog": {"fpcs": False}, "ptq4vit": {"eq_n": 4}, "q-hyvit": {"eq_n": 4}}


def _input_size(side: int) -> dict:
    """For models whose image size timm cannot infer from a fixed patch embedding."""
    return {"pretrained_cfg_overlay": {"input_size": (3, side, side)}}


def _first_stages(name: str, count: int) -> tuple:
    import timm.models.mobilevit as mobilevit

    return mobilevit.model_cfgs[name].blocks[:count]


def smoke_configs() -> dict[str, SmokeConfig]:
    """Family key -> its small config (built on call: some configs read timm's model tables)."""
    small_vit = {"depth": 2, "img_size": 64}
    narrow = {"embed_dim": 192, "num_heads": 3}
    return {
        "vit": SmokeConfig("ViT", "vit_tiny_patch16_224", small_vit),
        "deit_distilled": SmokeConfig("DeiT (distilled)", "deit_tiny_distilled_patch16_224", small_vit),
        "deit3": SmokeConfig("DeiT III (LayerScale)", "deit3_small_patch16_224", small_vit),
        "dinov2": SmokeConfig("DINOv2 (registers)", "vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 56}),
        "clip": SmokeConfig("CLIP image tower", "vit_base_patch16_clip_224", {**small_vit, **narrow}),
        "siglip": SmokeConfig("SigLIP image tower", "vit_base_patch16_siglip_224", {**small_vit, **narrow}),
        "swin": SmokeConfig("Swin", "swin_tiny_patch4_window7_224",
                            {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6), "img_size": 56},
                            "layers.0.blocks.1.attn.softmax"),
        "swinv2": SmokeConfig("Swin v2", "swinv2_tiny_window8_256",
                              {"embed_dim": 48, "depths": (2, 2), "num_heads": (3, 6), "img_size": 64},
                              "layers.0.blocks.1.attn.softmax"),
        "eva02": SmokeConfig("EVA02", "eva02_tiny_patch14_224", {"depth": 2}),
        "beit": SmokeConfig("BEiT", "beit_base_patch16_224", {**small_vit, **narrow}),
        # init_values 1: timm's 1e-5 LayerScale leaves a random model's blocks nearly the identity
        "cait": SmokeConfig("CaiT", "cait_xxs24_224", {**small_vit, "init_values": 1.0}),
        "xcit": SmokeConfig("XCiT", "xcit_nano_12_p16_224", {**small_vit, **_input_size(64)}),
        "pit": SmokeConfig("PiT", "pit_ti_224", {"depth": (1, 2, 1), "img_size": 64, **_input_size(64)},
                           "transformers.1.blocks.1.attn.softmax"),
        "convit": SmokeConfig("ConViT", "convit_tiny", {**small_vit, "local_up_to_layer": 1},
                              "blocks.0.attn.softmax"),
        "levit": SmokeConfig("LeViT", "levit_128s", {"img_size": 128, "depth": (2, 1, 1), **_input_size(128)},
                             "stages.1.downsample.attn_downsample.softmax"),
        # the first three stages (the third ends with a MobileViT block over 4x4 patches of 2x2 pixels)
        "mobilevit": SmokeConfig("MobileViT", "mobilevit_xxs",
                                 {"blocks": _first_stages("mobilevit_xxs", 3), **_input_size(64)},
                                 "stages.2.1.transformer.1.attn.softmax"),
        "mobilevitv2": SmokeConfig("MobileViT v2", "mobilevitv2_050",
                                   {"blocks": _first_stages("mobilevitv2_050", 3), **_input_size(64)},
                                   "stages.2.1.transformer.1.attn.softmax"),
        # the first two stages (windows of 4x4, then 2x2 pixels), one block each
        "efficientvit_msra": SmokeConfig("EfficientViT (MSRA)", "efficientvit_m0",
                                         {"embed_dim": (64, 128), "key_dim": (16, 16), "depth": (1, 1),
                                          "num_heads": (4, 4), "window_size": (7, 7),
                                          "down_ops": (("", 1), ("subsample", 2)), "img_size": 64,
                                          **_input_size(64)},
                                         "stages.0.blocks.0.mixer.m.attn.heads.1.softmax",
                                         batchnorm_statistics=True),
        "tinyvit": SmokeConfig("TinyViT", "tiny_vit_5m_224",
                               {"depths": (1, 1, 2, 1), "window_sizes": (7, 4, 4, 2), "num_classes": 1000,
                                **_input_size(64)},
                               "stages.2.blocks.1.attn.softmax"),
        # stem, two MBConv stages, then a stage of an MBConv and two EfficientViT blocks (LiteMLA over 4x4 pixels)
        "efficientvit_mit": SmokeConfig("EfficientViT (MIT)", "efficientvit_b0",
                                        {"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 2), "head_dim": 16,
                                         "head_widths": (64, 80), **_input_size(64)},
                                        None, batchnorm_statistics=True),
    }


def build_smoke_model(config: SmokeConfig, seed: int = 0, noise: float = 0.05) -> nn.Module:
    """``config``'s model, random-init with ``seed``, every parameter nudged by ``noise``·N(0, 1) (zero- or
    constant-initialised tables, biases and LayerScale gains then take part), timm's fused attention off."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(config.timm_name, pretrained=False, **config.kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    if config.batchnorm_statistics:
        _measure_batchnorm_statistics(model, seed)
    return model


@torch.no_grad()
def _measure_batchnorm_statistics(model: nn.Module, seed: int, n: int = 8) -> None:
    """Set every BatchNorm's running mean and variance to those of its input on ``n`` random images (others than
    :func:`smoke_images`'), then back to eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: the statistics of exactly these images
    model.train()
    size = expected_image_size(model) or tuple(model.pretrained_cfg["input_size"][1:])
    model(torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed + 2)))
    model.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def smoke_images(model: nn.Module, n: int = 2, seed: int = 1) -> torch.Tensor:
    """``n`` random images of the size ``model`` takes."""
    size = expected_image_size(model) or tuple(model.pretrained_cfg["input_size"][1:])
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))
