"""``QuantizedModel``: a wrapped timm model plus what is needed to rebuild and inspect it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vitq.config import QuantConfig
from vitq.models import Stage, adapter_by_family
from vitq.nn import QuantAttentionBase, QuantPoint
from vitq.quantizers import Quantizer


@dataclass
class Slot:
    """One quantizer slot: ``point`` (module path) + ``attr`` (e.g. ``weight_quantizer``)."""

    point: str
    attr: str
    role: str
    module: QuantPoint

    @property
    def name(self) -> str:
        return f"{self.point}.{self.attr}"

    @property
    def quantizer(self) -> Quantizer | None:
        return getattr(self.module, self.attr)

    @quantizer.setter
    def quantizer(self, quantizer: Quantizer | None) -> None:
        setattr(self.module, self.attr, quantizer)


class QuantizedModel(nn.Module):
    """A fake-quant model: ``model`` is the timm model with :mod:`vitq.nn` points inside.

    Point names are relative to ``model`` and equal the timm module names
    (``blocks.3.attn.softmax``), so ``model.state_dict()`` keeps timm's keys.
    """

    def __init__(self, model: nn.Module, model_name: str, family: str, config: QuantConfig) -> None:
        super().__init__()
        self.model = model
        self.model_name = model_name
        self.family = family
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ structure
    def points(self) -> dict[str, QuantPoint]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, QuantPoint)}

    def slots(self) -> list[Slot]:
        return [Slot(name, attr, role, point)
                for name, point in self.points().items() for attr, role in point.slots().items()]

    def quantizers(self) -> dict[str, Quantizer]:
        return {slot.name: slot.quantizer for slot in self.slots() if slot.quantizer is not None}

    def stages(self) -> list[Stage]:
        return adapter_by_family(self.family).stages(self.model)

    def norm_linear_pairs(self) -> list[tuple[str, str]]:
        """``(layernorm, linear)`` paths whose pair takes RepQ-ViT's fold (see the adapter's method)."""
        return adapter_by_family(self.family).norm_linear_pairs(self.model)

    def stage_quantizers(self, stage: Stage) -> list[Quantizer]:
        """Quantizers of the points that belong to ``stage``, in module order."""
        return [q for name, q in self.quantizers().items() if stage.contains(name)]

    def attention_modules(self, stage: Stage | None = None) -> list[QuantAttentionBase]:
        """The quantized attention modules (of ``stage``, or all), in module order."""
        return [m for name, m in self.model.named_modules()
                if isinstance(m, QuantAttentionBase) and (stage is None or stage.contains(name))]

    # ------------------------------------------------------------------ modes
    @contextmanager
    def quantization_disabled(self, stages: Sequence[Stage] | None = None) -> Iterator[QuantizedModel]:
        """Run the wrapped model in float (every quantizer passes its input through), or only ``stages`` of it
        (their quantizers off, the others as they are: e.g. a float tail behind a stage being reconstructed)."""
        quantizers = [q for name, q in self.quantizers().items()
                      if stages is None or any(stage.contains(name) for stage in stages)]
        previous = [q.enabled for q in quantizers]
        for q in quantizers:
            q.enabled = False
        try:
            yield self
        finally:
            for q, enabled in zip(quantizers, previous, strict=True):
                q.enabled = enabled

    def quant_specs(self) -> dict[str, dict | None]:
        """The spec of every slot (``None`` = float), enough to rebuild the quantizers."""
        return {slot.name: None if slot.quantizer is None else slot.quantizer.spec() for slot in self.slots()}
