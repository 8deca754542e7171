"""An integer-only reference runtime for a quantized ViT/DeiT (I-ViT style), built from a fake-quant model.

    runtime = IntegerViT.compile(qmodel, calib_images)
    logits = runtime(images)          # int64 logits; vitq.evaluate(runtime, data) works too

At run time every tensor after the input image is an integer: GEMMs on integer codes with integer
accumulators, requantization by dyadic multipliers (:func:`~vitq.export.integer_kernels.requantize`),
Shiftmax, ShiftGELU and integer LayerNorm (:mod:`vitq.export.integer_kernels`). The float image is quantized by
the model's own image quantizer, the only float operation. What comes from the fake-quant model: every weight's
integer codes and every quantization point's scale and zero point (so the 8-bit codes entering each GEMM are the
fake-quant model's, up to the approximations below). What the runtime adds, calibrated on the calibration
images (never the evaluation ones):

- the residual stream, float in the fake-quant model, is held as integers with one scale for the whole model
  (:data:`RESIDUAL_BITS` bits over 1.25x the largest residual magnitude seen);
- the fc1 output (per-channel accumulator scales) is requantized to one scale before ShiftGELU
  (:data:`HIDDEN_BITS` bits over 1.25x the largest magnitude seen).

Approximations (I-ViT's, see the kernels): ``e^x`` by shifts with a linear ``2^−r``, ``GELU`` as ``x·σ(1.702x)``,
integer square root and divisions rounded to integers. Supported: timm ``VisionTransformer`` models with a class
token (ViT, DeiT) whose activation quantizers are per-tensor uniform with integer zero points, the softmax
output also log2 / log√2 / TanQ (:class:`SoftmaxLevels`), and whose weight quantizers are uniform per output
channel or per tensor (``minmax``, ``percentile``, and the reparameterized methods quantized with ``--deploy
onnxruntime``); anything else is refused with the slot that prevents it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitq.device import model_device
from vitq.errors import VitqError
from vitq.export.integer_kernels import (
    PROB_BITS,
    dyadic,
    integer_layernorm,
    integer_matmul,
    probability_code_book,
    requantize,
    shift_gelu,
    shiftmax,
    units_per_one,
)
from vitq.nn import QConv2d, QLinear
from vitq.quantized_model import QuantizedModel
from vitq.quantizers.uniform import integer_grid_problem

RESIDUAL_BITS = 22
HIDDEN_BITS = 16
#: fixed-point bits of the LayerNorm gains γ/s_out
GAIN_BITS = 16
#: headroom over the largest calibration magnitude for the runtime's own scales
HEADROOM = 1.25
#: fixed-point bits of a non-uniform softmax level below the largest one (SoftmaxLevels)
LEVEL_BITS = 20


@dataclass(frozen=True)
class Codes:
    """Scale, zero point and code range of one per-tensor uniform quantizer (compile-time description)."""

    scale: float
    zero_point: int
    q_min: int
    q_max: int

    @classmethod
    def of(cls, quantizer, slot: str) -> Codes:
        problem = integer_grid_problem(quantizer, per_row=False)
        if problem is not None:
            hint = " (quantizing with --deploy onnxruntime rounds it)" if "fractional zero point" in problem else ""
            raise VitqError(f"integer runtime: {slot} must be a per-tensor uniform quantizer: {problem}{hint}")
        return cls(float(quantizer.scale), int(quantizer.zero_point), quantizer.q_min, quantizer.q_max)


class Requantizer(nn.Module):
    """``acc`` with real scale ``acc_scale`` (per tensor or per last-axis channel) to codes of ``target``, or to a
    plain integer of scale ``target_scale`` (no zero point, no clamp)."""

    def __init__(self, acc_scale: torch.Tensor | float, target: Codes | None = None,
                 target_scale: float | None = None) -> None:
        super().__init__()
        scale = target.scale if target is not None else target_scale
        mantissa, shift = dyadic(torch.as_tensor(acc_scale, dtype=torch.float64) / scale)
        self.register_buffer("mantissa", mantissa)
        self.register_buffer("shift", shift)
        self.target = target

    def forward(self, acc: torch.Tensor) -> torch.Tensor:
        if self.target is None:
            return requantize(acc, self.mantissa, self.shift)
        t = self.target
        return requantize(acc, self.mantissa, self.shift, t.zero_point, t.q_min, t.q_max)


class SoftmaxLevels(nn.Module):
    """Integer probabilities (``2^−PROB_BITS`` units) → the softmax quantizer's codes → its levels, as integers of
    real scale :attr:`unit`, ready for the product with ``v − z_v``.

    A per-tensor uniform quantizer: codes by dyadic requantization, levels ``q − z`` (exact, ``unit = Δ``).
    A quantizer with other integer codes (``log2``, ``log_sqrt2``, ``tanq``, ``twin_uniform_softmax``): two
    lookups built at compile time from the quantizer itself, one entry per integer probability (the fake-quant
    codes of ``p·2^−PROB_BITS``, exactly) and one per code (its level in fixed point, :data:`LEVEL_BITS` bits
    below the largest level; a level under half a unit rounds to 0). For the log kinds this is the shift kernel
    ``Δ·2^−q`` (``Δ·2^−q/2``) as a table: no float operation at run time.
    """

    def __init__(self, quantizer, slot: str) -> None:
        super().__init__()
        self.uniform = integer_grid_problem(quantizer, per_row=False) is None
        if self.uniform:
            codes = Codes.of(quantizer, slot)
            self.requantize = Requantizer(2.0**-PROB_BITS, codes)
            self.zero_point, self.unit = codes.zero_point, codes.scale
            return
        book = probability_code_book(quantizer)
        if isinstance(book, str):
            raise VitqError(f"integer runtime: {slot} must be a per-tensor uniform quantizer or one with integer "
                            f"codes: {book} ({integer_grid_problem(quantizer, per_row=False)})")
        code_table, levels = book
        self.unit = float(levels.max()) / 2**LEVEL_BITS
        self.register_buffer("code_table", code_table)
        self.register_buffer("level_table", torch.round(levels / self.unit).to(torch.int64))

    def forward(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.uniform:
            return self.requantize(probabilities) - self.zero_point
        return self.level_table[self.code_table[probabilities]]


class IntegerLinear(nn.Module):
    """``(x − z_x)·(W − z_W)ᵀ + round(b / (s_x·s_W))`` on codes; ``acc_scale = s_x·s_W`` per output channel."""

    def __init__(self, layer: QLinear | QConv2d, name: str) -> None:
        super().__init__()
        inputs = Codes.of(layer.input_quantizer, f"{name}.input_quantizer")
        weights = layer.weight_quantizer
        problem = integer_grid_problem(weights, per_row=True)
        if problem is not None:
            raise VitqError(f"integer runtime: {name}.weight_quantizer must be uniform per output channel or "
                            f"tensor: {problem}")
        weight = layer.weight.detach()
        codes = weights.int_repr(weight).to(torch.int64).reshape(weight.shape[0], -1)
        zero = weights.zero_point.detach().reshape(-1, 1)
        w_scale = weights.scale.detach().double().reshape(-1).expand(weight.shape[0])
        acc_scale = inputs.scale * w_scale
        self.register_buffer("weight", codes - zero.to(torch.int64))
        bias = (torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) if layer.bias is None
                else layer.bias.double())
        self.register_buffer("bias", torch.round(bias.detach() / acc_scale).to(torch.int64))
        self.register_buffer("acc_scale", acc_scale)
        self.input_zero = inputs.zero_point

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return integer_matmul(codes - self.input_zero, self.weight.T) + self.bias


class IntegerLayerNorm(nn.Module):
    """LayerNorm from residual codes (scale ``residual_scale``) to the codes of the next quantizer."""

    def __init__(self, norm: nn.LayerNorm, residual_scale: float, target: Codes) -> None:
        super().__init__()
        gain = norm.weight.detach().double() / target.scale * 2**GAIN_BITS
        self.register_buffer("gain", torch.round(gain).to(torch.int64))
        offset = torch.round(norm.bias.detach().double() / target.scale) + target.zero_point
        self.register_buffer("offset", offset.to(torch.int64))
        self.eps_units = max(1, round(norm.eps / residual_scale**2))
        self.target = target

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        return integer_layernorm(residual, self.gain, GAIN_BITS, self.offset, self.eps_units, self.target.q_min,
                                 self.target.q_max)


class IntegerBlock(nn.Module):
    """One pre-norm transformer block: ``r += proj(attn(LN1(r)))``, ``r += fc2(GELU(fc1(LN2(r))))``."""

    def __init__(self, block: nn.Module, name: str, residual_scale: float, hidden_scale: float) -> None:
        super().__init__()
        attn, mlp = block.attn, block.mlp
        self.heads = attn.num_heads
        q, k, v = (Codes.of(getattr(attn, p).quantizer, f"{name}.attn.{p}.quantizer") for p in "qkv")
        proj_in = Codes.of(attn.proj.input_quantizer, f"{name}.attn.proj.input_quantizer")
        fc2_in = Codes.of(mlp.fc2.input_quantizer, f"{name}.mlp.fc2.input_quantizer")
        self.norm1 = IntegerLayerNorm(block.norm1, residual_scale, Codes.of(attn.qkv.input_quantizer,
                                                                            f"{name}.attn.qkv.input_quantizer"))
        self.qkv = IntegerLinear(attn.qkv, f"{name}.attn.qkv")
        dim = attn.qkv.weight.shape[1]
        acc = self.qkv.acc_scale
        # timm scales q by head_dim^−½ before the q quantizer: fold it into q's multiplier
        self.to_q = Requantizer(acc[:dim] * attn.scale, q)
        self.to_k, self.to_v = Requantizer(acc[dim:2 * dim], k), Requantizer(acc[2 * dim:], v)
        self.zeros = (q.zero_point, k.zero_point, v.zero_point)
        self.score_shift, self.score_units = units_per_one(q.scale * k.scale)
        self.softmax = SoftmaxLevels(attn.softmax.quantizer, f"{name}.attn.softmax.quantizer")
        self.to_proj = Requantizer(self.softmax.unit * v.scale, proj_in)
        self.proj = IntegerLinear(attn.proj, f"{name}.attn.proj")
        self.proj_to_residual = Requantizer(self.proj.acc_scale, target_scale=residual_scale)
        self.norm2 = IntegerLayerNorm(block.norm2, residual_scale, Codes.of(mlp.fc1.input_quantizer,
                                                                            f"{name}.mlp.fc1.input_quantizer"))
        self.fc1 = IntegerLinear(mlp.fc1, f"{name}.mlp.fc1")
        self.to_hidden = Requantizer(self.fc1.acc_scale, target_scale=hidden_scale)
        self.hidden_shift, self.hidden_units = units_per_one(hidden_scale)
        # shift_gelu returns (hidden codes << shift) · σ, σ in 2^−PROB_BITS units
        self.to_fc2 = Requantizer(hidden_scale / 2**self.hidden_shift * 2.0**-PROB_BITS, fc2_in)
        self.fc2 = IntegerLinear(mlp.fc2, f"{name}.mlp.fc2")
        self.fc2_to_residual = Requantizer(self.fc2.acc_scale, target_scale=residual_scale)

    def attention(self, codes: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = codes.shape
        # the qkv accumulator's channels are [q | k | v], each heads x head_dim: requantize, then split heads
        q, k, v = (requantizer(part).reshape(batch, tokens, self.heads, -1).transpose(1, 2)
                   for requantizer, part in zip((self.to_q, self.to_k, self.to_v), self.qkv(codes).chunk(3, dim=-1),
                                                strict=True))
        z_q, z_k, z_v = self.zeros
        scores = integer_matmul(q - z_q, (k - z_k).transpose(-2, -1)) << self.score_shift
        out = integer_matmul(self.softmax(shiftmax(scores, self.score_units)), v - z_v)
        return self.to_proj(out.transpose(1, 2).reshape(batch, tokens, -1))

    def forward(self, residual: torch.Tensor) -> torch.Tensor:
        residual = residual + self.proj_to_residual(self.proj(self.attention(self.norm1(residual))))
        hidden = self.to_hidden(self.fc1(self.norm2(residual))) << self.hidden_shift
        gelu = shift_gelu(hidden, self.hidden_units)
        return residual + self.fc2_to_residual(self.fc2(self.to_fc2(gelu)))


def _check_supported(qmodel: QuantizedModel) -> None:
    model = qmodel.model
    if qmodel.family != "vit" or getattr(model, "global_pool", None) != "token" \
            or getattr(model, "num_prefix_tokens", None) != 1:
        raise VitqError("integer runtime: only ViT/DeiT models with one class token are supported")
    # parts of the timm ViT the integer blocks do not compute: refused rather than silently skipped
    block = model.blocks[0]
    extras = {"a LayerNorm before the blocks (norm_pre, e.g. CLIP)": model.norm_pre,
              "LayerScale (DeiT III)": block.ls1, "qk-norm": block.attn.q_norm,
              "a norm after pooling (fc_norm)": model.fc_norm}
    for what, module in extras.items():
        if not isinstance(module, nn.Identity):
            raise VitqError(f"integer runtime: {what} is not supported")


class IntegerViT(nn.Module):
    """The integer-only model: image → codes → integer patch embedding → integer blocks → integer logits."""

    def __init__(self, qmodel: QuantizedModel, residual_scale: float, hidden_scale: float) -> None:
        super().__init__()
        model = qmodel.model
        _check_supported(qmodel)
        split = [name for name, m in model.named_modules() if getattr(m, "outlier_split", None) is not None]
        if split:
            raise VitqError(f"integer runtime: {split[0]} keeps outlier input channels float (--outliers)")
        quantized_norm_inputs = [slot.name for slot in qmodel.slots() if slot.role == "pre_ln" and slot.quantizer]
        if quantized_norm_inputs:
            raise VitqError(f"integer runtime: {quantized_norm_inputs[0]} quantizes a LayerNorm input; the runtime "
                            "holds the residual stream as its own 22-bit integers instead")
        conv = model.patch_embed.proj
        self.image = conv.input_quantizer
        Codes.of(self.image, "patch_embed.proj.input_quantizer")
        self.patch = tuple(conv.weight.shape[-2:])
        self.patch_embed = IntegerLinear(conv, "patch_embed.proj")
        self.patch_to_residual = Requantizer(self.patch_embed.acc_scale, target_scale=residual_scale)
        cls_token = torch.round(model.cls_token.detach().double() / residual_scale).to(torch.int64)
        pos_embed = torch.round(model.pos_embed.detach().double() / residual_scale).to(torch.int64)
        self.register_buffer("cls_token", cls_token)
        self.register_buffer("pos_embed", pos_embed)
        self.blocks = nn.ModuleList(IntegerBlock(block, f"blocks.{i}", residual_scale, hidden_scale)
                                    for i, block in enumerate(model.blocks))
        self.norm = IntegerLayerNorm(model.norm, residual_scale, Codes.of(model.head.input_quantizer,
                                                                          "head.input_quantizer"))
        self.head = IntegerLinear(model.head, "head")
        # one common scale for the logits (the smallest accumulator scale): argmax needs comparable integers
        self.to_logits = Requantizer(self.head.acc_scale, target_scale=float(self.head.acc_scale.min()))

    @classmethod
    def compile(cls, qmodel: QuantizedModel, calib_images: torch.Tensor, batch_size: int = 32) -> IntegerViT:
        """Build the runtime on ``qmodel``'s device; its own two scales (residual stream, GELU input) come from
        ``calib_images`` (moved there)."""
        _check_supported(qmodel)  # before the calibration pass, which reads the ViT's blocks
        device = model_device(qmodel)
        residual_max, hidden_max = _calibration_ranges(qmodel, calib_images.to(device), batch_size)
        # constants built from Python numbers (the dyadic multipliers of fixed scales) start on the CPU: move all
        return cls(qmodel, HEADROOM * residual_max / 2 ** (RESIDUAL_BITS - 1),
                   HEADROOM * hidden_max / 2 ** (HIDDEN_BITS - 1)).to(device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Residual codes [B, 1 + patches, dim] of float ``images`` (quantized by the image quantizer)."""
        codes = self.image.int_repr(images).to(torch.int64)  # the one float → integer step
        batch, channels, height, width = codes.shape
        ph, pw = self.patch
        patches = codes.reshape(batch, channels, height // ph, ph, width // pw, pw).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, (height // ph) * (width // pw), channels * ph * pw)
        tokens = self.patch_to_residual(self.patch_embed(patches))
        return torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1) + self.pos_embed

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        residual = self.embed(images)
        for block in self.blocks:
            residual = block(residual)
        return self.to_logits(self.head(self.norm(residual[:, 0])))


def _calibration_ranges(qmodel: QuantizedModel, images: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Largest |residual stream| (block inputs and the final norm's input) and |fc1 output| of the fake-quant
    model on ``images``."""
    model = qmodel.model
    zero = torch.zeros((), device=images.device)
    found = {"residual": zero, "hidden": zero}

    def track(key: str, tensor: torch.Tensor) -> None:  # a running maximum kept on the device: no sync per batch
        found[key] = torch.maximum(found[key], tensor.detach().abs().amax())

    hooks = [block.register_forward_pre_hook(lambda m, args: track("residual", args[0])) for block in model.blocks]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, args: track("residual", args[0])))
    hooks += [block.mlp.fc1.register_forward_hook(lambda m, args, out: track("hidden", out)) for block in model.blocks]
    try:
        with torch.no_grad():
            for chunk in images.split(batch_size):
                qmodel(chunk)
    finally:
        for hook in hooks:
            hook.remove()
    return float(found["residual"]), float(found["hidden"])
