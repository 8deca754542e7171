"""Rotate a ViT/DeiT's residual stream and attention heads by randomized Hadamard matrices, keeping its function.

Outliers concentrated in a few channels make per-tensor activation quantization coarse for every other channel.
An orthogonal rotation ``Q`` of the residual stream spreads them over all channels (QuaRot, SpinQuant), and it
can be folded into the weights offline, so the rotated float model computes exactly what the original did.
:func:`rotate_vit` does it in place, in float64, on a timm ``VisionTransformer``:

1. **LayerNorm → RMSNorm.** A LayerNorm subtracts each token's mean, which a rotation does not commute with. So
   every writer of the residual stream (patch embedding, class/distillation tokens, position embedding, each
   block's ``attn.proj`` and ``mlp.fc2``, LayerScale folded into them first) is made to write mean-free vectors:
   its output is projected by ``C = I − 11ᵀ/d``. The stream is then mean-free, so ``LayerNorm(x) = γ ⊙
   x/rms(x) + β``. The normalisation becomes ``nn.RMSNorm`` without affine (same ``eps``), and ``γ``, ``β`` are
   folded into the readers: ``W ← W·diag(γ)``, ``b ← b + W·β`` (``qkv``, ``fc1``, the head).
2. **Residual rotation.** ``x' = x·Q`` with ``Q = diag(s)·H/√d`` (``H`` a Hadamard matrix, ``s`` random signs):
   writers ``W ← Qᵀ·C·W`` (rows), readers ``W ← W·Q`` (columns). ``rms(x·Q) = rms(x)``, so each RMSNorm output
   is rotated the same way and the readers undo it.
3. **Head-wise rotations** inside attention, exact because attention mixes tokens and not channels: per head,
   ``q`` and ``k`` by the same ``R`` (``q·kᵀ`` unchanged), ``v`` by ``S`` with ``S`` undone by ``proj``'s input
   columns of that head.

Hadamard sizes: ``2^k``, ``12·2^k`` and ``20·2^k`` (Sylvester's construction, Kronecker with Paley's 12- and
20-point matrices), which covers the ViT widths 192, 384, 768, 1024 and head width 64. Other sizes are refused.
The float logits are unchanged up to float32 rounding (tested to 1e-5 relative).
"""

from __future__ import annotations

import torch
from torch import nn

from vitq.errors import VitqError

#: the non-power-of-two Hadamard factors built by Paley's construction (from the primes 11 and 19)
PALEY_ORDERS = (12, 20)


def _paley(order: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of ``order = q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in residues else -1 for a in range(1, q)]  # the Legendre symbol of a mod q
    jacobsthal = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    skew = torch.zeros(order, order, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0], skew[1:, 1:] = 1.0, -1.0, jacobsthal
    return torch.eye(order, dtype=torch.float64) + skew


def hadamard(n: int) -> torch.Tensor:
    """An ``n × n`` matrix of ±1 with ``H·Hᵀ = n·I`` (float64), for ``n = 2^k``, ``12·2^k`` or ``20·2^k``."""
    def power_of_two(k: int) -> bool:
        return k >= 1 and k & (k - 1) == 0

    base = next((b for b in (1, *PALEY_ORDERS) if n % b == 0 and power_of_two(n // b)), None)
    if base is None:
        raise VitqError(f"no Hadamard matrix of size {n} here: sizes are 2^k, 12·2^k or 20·2^k")
    power = n // base
    matrix = torch.ones(1, 1, dtype=torch.float64) if base == 1 else _paley(base)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < power:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)])
    return torch.kron(matrix, sylvester)


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """``diag(s)·H/√n`` with random signs ``s``: orthogonal (float64)."""
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return signs[:, None] * hadamard(n) / n**0.5


def _check_vit(model: nn.Module) -> None:
    for name in ("patch_embed", "blocks", "norm", "head", "pos_embed"):
        if not hasattr(model, name):
            raise VitqError(f"rotation needs a timm VisionTransformer; {type(model).__name__} has no {name}")
    problems = []
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, name, nn.Identity()), nn.Identity):
            problems.append(name)
    if not isinstance(model.patch_embed.norm, nn.Identity):
        problems.append("patch_embed.norm")
    if not isinstance(model.norm, nn.LayerNorm):
        problems.append("norm (not a LayerNorm)")
    if not isinstance(model.head, nn.Linear):
        problems.append("no classification head (the head undoes the rotation)")
    elif model.head.in_features != model.pos_embed.shape[-1]:
        problems.append(f"a head reading {model.head.in_features} features, not one token's")
    if getattr(model, "attn_pool", None) is not None:
        problems.append("attn_pool (an attention-pooling head)")
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        for name, module in (("norm1", block.norm1), ("norm2", block.norm2)):
            if not isinstance(module, nn.LayerNorm):
                problems.append(f"blocks.{i}.{name} (not a LayerNorm)")
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                problems.append(f"blocks.{i}.attn.{name}")
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or not hasattr(mlp, "fc2"):
            problems.append(f"blocks.{i}.mlp")
    if problems:
        raise VitqError(f"rotation is exact only for plain ViT/DeiT blocks; this model has {', '.join(problems)}")


def _fold_layerscale(layer: nn.Linear, scale: nn.Module) -> None:
    """``ls(W x + b)`` → ``(diag(γ)W) x + γ ⊙ b``; the LayerScale becomes the identity (``γ`` set to 1)."""
    gamma = getattr(scale, "gamma", None)
    if gamma is None:
        return
    g = gamma.detach().double()
    layer.weight.copy_(layer.weight.double() * g[:, None])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.double() * g)
    gamma.fill_(1.0)


def _write(weight: torch.Tensor, bias: torch.Tensor | None, into: torch.Tensor) -> None:
    """A writer of the residual stream: ``W ← into·W`` over its output rows (``into = Qᵀ·C``)."""
    shape = weight.shape
    weight.copy_((into @ weight.double().reshape(shape[0], -1)).reshape(shape))
    if bias is not None:
        bias.copy_(into @ bias.double())


def _read(layer: nn.Linear, norm: nn.LayerNorm, rotation: torch.Tensor) -> None:
    """A reader of a normalised stream: ``W(γ ⊙ n + β) + b`` with ``n = n'·Qᵀ`` → ``W' = W·diag(γ)·Q``,
    ``b' = b + W·β``."""
    weight = layer.weight.double()
    shift = weight @ norm.bias.double() if norm.bias is not None else 0.0
    gamma = norm.weight.double() if norm.weight is not None else torch.ones_like(weight[0])
    layer.weight.copy_((weight * gamma) @ rotation)
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.double() + shift)
    elif norm.bias is not None:
        layer.bias = nn.Parameter(shift.to(layer.weight.dtype))


def _rms_norm(norm: nn.LayerNorm) -> nn.RMSNorm:
    return nn.RMSNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False,
                      device=norm.weight.device if norm.weight is not None else None)


def _rotate_heads(attn: nn.Module, generator: torch.Generator) -> None:
    """Per head: ``q``, ``k`` by ``R`` and ``v`` by ``S`` (rows of ``qkv``), ``S`` undone in ``proj``'s columns."""
    heads, width = attn.num_heads, attn.head_dim
    qkv, proj = attn.qkv, attn.proj
    device = qkv.weight.device
    r, s = random_hadamard(width, generator).to(device), random_hadamard(width, generator).to(device)
    rows = torch.block_diag(*[r.T] * heads)
    rows = torch.block_diag(rows, rows, torch.block_diag(*[s.T] * heads))  # q, k, v
    qkv.weight.copy_(rows @ qkv.weight.double())
    if qkv.bias is not None:
        qkv.bias.copy_(rows @ qkv.bias.double())
    proj.weight.copy_(proj.weight.double() @ torch.block_diag(*[s] * heads))


@torch.no_grad()
def rotate_vit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Rotate ``model`` (a timm ``VisionTransformer``: ViT, DeiT, distilled DeiT) in place (module notes) and return
    it. ``seed`` draws the random signs; the same seed gives the same model."""
    _check_vit(model)
    dim = model.pos_embed.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    rotation = random_hadamard(dim, generator).to(model.pos_embed.device)
    centre = torch.eye(dim, dtype=torch.float64, device=rotation.device) - 1.0 / dim
    into = rotation.T @ centre  # writers: centre, then rotate

    proj = model.patch_embed.proj
    _write(proj.weight, proj.bias, into)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        tokens = getattr(model, name, None)
        if tokens is not None:
            tokens.copy_(tokens.double() @ into.T)
    for block in model.blocks:
        _rotate_heads(block.attn, generator)
        _fold_layerscale(block.attn.proj, block.ls1)
        _fold_layerscale(block.mlp.fc2, block.ls2)
        _write(block.attn.proj.weight, block.attn.proj.bias, into)
        _write(block.mlp.fc2.weight, block.mlp.fc2.bias, into)
        _read(block.attn.qkv, block.norm1, rotation)
        _read(block.mlp.fc1, block.norm2, rotation)
        block.norm1, block.norm2 = _rms_norm(block.norm1), _rms_norm(block.norm2)
    heads = [model.head] + ([model.head_dist] if isinstance(getattr(model, "head_dist", None), nn.Linear) else [])
    for head in heads:
        if isinstance(head, nn.Linear):
            _read(head, model.norm, rotation)
    model.norm = _rms_norm(model.norm)
    return model


__all__ = ["hadamard", "random_hadamard", "rotate_vit"]
