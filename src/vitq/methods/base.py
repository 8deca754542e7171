"""The method interface and registry.

A method decides two things:

1. which quantizer each slot gets (``quantizer_spec``: by slot role, e.g. a log quantizer for
   ``softmax`` slots), before any data is seen. This is the model's *structure*, so a saved model
   can be rebuilt from the specs alone;
2. how the quantizers (and possibly weights) are calibrated (``calibrate``), usually block by
   block with :mod:`vitq.calib.runner`.

Register a method with ``@register_method("name")``; one method per file.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vitq.calib.runner import calibrate_in_forward_order
from vitq.config import QuantConfig, ReconConfig, make
from vitq.errors import VitqError
from vitq.registry import Registry


class Method:
    """Base class. The default structure is the papers' convention (NOTES §2.0):
    per-output-channel asymmetric weights at ``w_bits``, per-tensor asymmetric activations at
    ``a_bits``, the patch-embedding input at ``image_bits``.
    """

    name: ClassVar[str] = ""
    #: range initialiser of the default uniform quantizers
    init: ClassVar[str] = "minmax"
    #: (w_bits, a_bits) settings the leaderboard runs for this method beyond the common ones (e.g. W3A4 for the
    #: weight-rounding methods, whose papers report it)
    extra_settings: ClassVar[tuple[tuple[int, int], ...]] = ()
    #: a reconstruction-based method always reconstructs (with :attr:`recon_defaults` under the user's settings);
    #: the calibration-only leaderboard leaves it out (not like-for-like, NOTES §4.1)
    reconstructs: ClassVar[bool] = False
    recon_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        unknown = set(config.options) - set(self.option_names())
        if unknown:
            raise VitqError(f"method {self.name!r} has no option(s) {', '.join(sorted(unknown))}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the method-specific options accepted in ``QuantConfig.options``."""
        return ()

    def quantizer_spec(self, role: str) -> dict[str, Any] | None:
        """The quantizer of a slot with ``role`` (``None`` keeps it float)."""
        cfg = self.config
        if role == "pre_ln":  # LayerNorm inputs stay float unless a method quantizes them (FQ-ViT)
            return None
        if role == "weight":
            return {"kind": "uniform", "bits": cfg.w_bits, "granularity": "channel", "axis": 0, "init": self.init}
        bits = cfg.image_bits if role == "image" else cfg.a_bits
        return {"kind": "uniform", "bits": bits, "granularity": "tensor", "init": self.init}

    def slot_spec(self, slot) -> dict[str, Any] | None:
        """The quantizer of ``slot`` (a :class:`~vitq.quantized_model.Slot`). Default: by its role alone;
        a method that treats some layers apart (e.g. by the role of their input) overrides this."""
        return self.quantizer_spec(slot.role)

    def calibrate(self, qmodel, images: torch.Tensor, *, progress: bool = True) -> None:
        """Calibrate ``qmodel`` (whose quantizers are built but uncalibrated) on ``images``.

        Default: every quantizer initialises on the whole calibration batch in forward order.
        """
        calibrate_in_forward_order(qmodel, images, progress=progress)


    def reconstruction(self) -> ReconConfig | None:
        """The block reconstruction to run after :meth:`calibrate` (:mod:`vitq.calib.recon`), ``None`` for
        none: ``config.reconstruct`` (so any method can be reconstructed: ``vitq quantize --reconstruct``), or
        for a reconstruction-based method always, its :attr:`recon_defaults` overridden by the settings the
        user gave explicitly."""
        given = self.config.reconstruct
        if given is None and not self.reconstructs:
            return None
        explicit = {} if given is None else given.model_dump(include=given.model_fields_set)
        return make(ReconConfig, **{**self.recon_defaults, **explicit})


METHODS: Registry[type[Method]] = Registry("method", attribute="name")
#: class decorator: make a method available by name (config, CLI, compare)
register_method = METHODS.register
method_names = METHODS.names
method_class = METHODS.get
