"""NoisyQuant's quantizer (Liu et al., CVPR 2023): a fixed noisy bias added before uniform quantization.

    x̂ = Q(x + N) − N,      N_c = a·Δ₀·u_c,  u_c ~ U(−½, ½) drawn once per channel (last axis) with a seed

The noise is a constant vector, so subtracting it after the quantizer is the same as folding ``−W·N`` into
the next Linear's bias (``W·Q(x + N) + (b − W·N)``), which is how it deploys: the quantized tensor stays an
ordinary uniform per-tensor code. On heavy-tailed activations (post-GELU) the noise spreads each channel's
values over the rounding boundaries, so the rounding errors of a group of inputs stop being correlated and
partly cancel in the next layer's sum.

``a`` (the noise width in units of the noise-free step ``Δ₀``) is chosen among ``amplitudes`` by the next
layer's output error (:meth:`search_candidates` + :func:`vitq.calib.search.search_by_output_error`); With ``0`` among
the amplitudes (the default) plain uniform quantization is a candidate, so the search never does worse on the
calibration data. Plain :meth:`calibrate` (no consumer known) uses ``a = 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vitq.errors import VitqError
from vitq.quantizers.registry import register_quantizer
from vitq.quantizers.uniform import UniformQuantizer, uniform_params

DEFAULT_AMPLITUDES = (0.0, 0.25, 0.5, 0.75, 1.0)


@register_quantizer("noisy_uniform")
class NoisyUniformQuantizer(UniformQuantizer):
    """Per-tensor uniform quantizer of ``x + N`` (``N`` per last-axis channel), returning ``Q(x + N) − N``."""

    param_names = ("scale", "zero_point", "noise")

    def __init__(self, bits: int, amplitudes: Sequence[float] = DEFAULT_AMPLITUDES, noise_seed: int = 0,
                 **uniform: object) -> None:
        if uniform.get("granularity", "tensor") != "tensor":
            raise VitqError("noisy_uniform is per tensor (its noise is per channel)")
        amplitudes = tuple(float(a) for a in amplitudes)
        if not amplitudes or any(a < 0 for a in amplitudes):
            raise VitqError(f"noise amplitudes must be a non-empty list of values >= 0, got {amplitudes!r}")
        super().__init__(bits, **uniform)
        self._spec_kwargs.update(amplitudes=list(amplitudes), noise_seed=noise_seed)
        self.amplitudes, self.noise_seed = amplitudes, noise_seed

    def _unit_noise(self, channels: int) -> torch.Tensor:
        """The seeded U(−½, ½) draw, one value per channel (the same for every amplitude), drawn on the CPU so that
        a seed gives the same noise on every device."""
        generator = torch.Generator().manual_seed(self.noise_seed)
        return torch.rand(channels, generator=generator) - 0.5

    def _uniform_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step and zero point the range initialiser gives ``x`` (nothing is installed)."""
        return uniform_params(*self.fit_range(x), self.bits, self.signed, self.symmetric)

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """One candidate per amplitude: the noise, and the uniform range calibrated on ``x + noise``."""
        base_scale, _ = self._uniform_params(x)
        unit = self._unit_noise(x.shape[-1]).to(device=x.device, dtype=x.dtype)  # drawn on the CPU
        candidates = []
        for amplitude in self.amplitudes:
            noise = amplitude * base_scale.reshape(()) * unit
            scale, zero_point = self._uniform_params(x + noise)
            candidates.append({"scale": scale.clone(), "zero_point": zero_point.clone(), "noise": noise})
        return candidates

    def calibrate(self, x: torch.Tensor) -> None:
        """No consumer to judge the noise by: plain uniform quantization (zero noise)."""
        super().calibrate(x)
        self.noise = x.new_zeros(x.shape[-1])

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        return super().int_repr(x + self.noise)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return super().dequantize(codes) - self.noise

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        return super().quantize_dequantize(x + self.noise) - self.noise
