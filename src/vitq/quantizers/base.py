"""The quantizer interface shared by every quantization scheme.

A quantizer is an ``nn.Module`` that maps a float tensor to its dequantized ("fake-quant") value.
Its parameters (scales, zero points, extra shape parameters) are *buffers*, so a quantized
model's ``state_dict`` holds everything needed to rebuild it, and their shapes are only known
after calibration (per-tensor vs per-channel). ``_load_from_state_dict`` therefore adopts the
shapes it finds in the checkpoint instead of demanding them up front.

Life cycle:
1. build from a spec (``build_quantizer({"kind": "uniform", "bits": 4, ...})``);
2. calibrate: either call :meth:`calibrate` with data, or set ``calibrating = True`` and run the
   model: the first forward call then calibrates on its input before quantizing it. This gives the
   RepQ-ViT "forward order" calibration, where every quantizer sees inputs that are already
   quantized upstream;
3. ``forward`` (fake-quant) / ``int_repr`` (integer codes) / ``dequantize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from vitq.errors import VitqError

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is an integer in 2..8, else raise a readable error."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise VitqError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}")
    return bits


class Quantizer(nn.Module):
    """Base class: fake-quantizes tensors once calibrated."""

    kind: ClassVar[str] = ""
    #: names of the buffers that hold the calibrated parameters
    param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, bits: int, **spec_kwargs: Any) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = True
        self.calibrating = False
        #: optional replacement for :meth:`calibrate` in forward-order calibration, set by methods that
        #: choose parameters by a downstream error (e.g. the attention output); never saved
        self.calibrator: Callable[[torch.Tensor], None] | None = None
        self._spec_kwargs = dict(spec_kwargs)
        for name in self.param_names:
            self.register_buffer(name, torch.empty(0))

    # ----------------------------------------------------------------- spec / state
    def spec(self) -> dict[str, Any]:
        """The constructor arguments, enough to rebuild an uncalibrated twin of this quantizer."""
        return {"kind": self.kind, "bits": self.bits, **self._spec_kwargs}

    def describe(self) -> str:
        """A short label: ``uniform 4-bit channel`` (kind, bits, granularity when it has one)."""
        spec = self.spec()
        return " ".join(str(p) for p in (spec["kind"], f"{spec['bits']}-bit", spec.get("granularity")) if p)

    @property
    def is_calibrated(self) -> bool:
        return all(getattr(self, name).numel() > 0 for name in self.param_names)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Calibrated shapes are data dependent: adopt the checkpoint's shapes before loading, on this quantizer's
        # own device (a CPU state loaded into a GPU model, e.g. a reconstruction checkpoint, stays on the GPU).
        for name in self.param_names:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ----------------------------------------------------------------- quantization
    def calibrate(self, x: torch.Tensor) -> None:
        """Set the quantization parameters from sample data ``x``."""
        raise NotImplementedError

    def search_candidates(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Candidate parameter sets for a search driven by a downstream error (e.g. the attention
        output ``Q(A)·V`` instead of ``Q(A)`` itself). Empty when the kind has nothing to search."""
        return []

    def set_params(self, params: dict[str, torch.Tensor]) -> None:
        """Install calibrated parameters (one of :meth:`search_candidates`, or computed elsewhere)."""
        unknown = set(params) - set(self.param_names)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no parameter(s) {sorted(unknown)}")
        for name, value in params.items():
            setattr(self, name, value.detach().clone())

    def get_params(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).clone() for name in self.param_names}

    def fake_quant_candidates(self, x: torch.Tensor,
                              candidates: Sequence[dict[str, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """Q(x) under each candidate in turn (a search's inner loop). Installs each candidate; kinds that
        can share work between candidates override this without installing anything."""
        for params in candidates:
            self.set_params(params)
            yield self.quantize_dequantize(x)

    def quantize_dequantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quant of ``x`` with the calibrated parameters."""
        raise NotImplementedError

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32)."""
        raise NotImplementedError

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Float values of integer codes, so that ``dequantize(int_repr(x)) == forward(x)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.calibrating:
            with torch.no_grad():
                (self.calibrator or self.calibrate)(x.detach())
            self.calibrating = False
        if not self.is_calibrated:
            raise VitqError(f"{type(self).__name__} used before calibration")
        return self.quantize_dequantize(x)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "kind")


def first_minimum(errors: Sequence[torch.Tensor]) -> int:
    """Index of the smallest of ``errors`` (scalar tensors on one device), the first one on ties; NaN never wins.

    A search keeps its candidates' errors on their device and reads back only this index: one transfer per
    search, where a Python comparison per candidate would wait for the device at every candidate."""
    stacked = torch.stack([error.reshape(()) for error in errors])
    return int(torch.nan_to_num(stacked, nan=math.inf).argmin())
