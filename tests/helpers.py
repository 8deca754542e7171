"""Helpers shared by several test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


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
