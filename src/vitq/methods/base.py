"""The method interface and registry.

A method decides two things:

1. which quantizer each slot gets (``quantizer_spec``: by slot role, e.g. a log quantizer for
   ``softmax`` slots), before any data is seen. This is the model's *structure*, so a saved model
   can be rebuilt from the specs alone;
2. how the quantizers (and possibly weights) are calibrated (``calibrate``), usually block by
   block with :mod:`vitq.calib.runner`.

Its options are a typed :class:`MethodOptions` model (``Options``): type, default, allowed range and a
one-line description each, validated when the method is built; :attr:`Method.paper` names its paper.

Register a method with ``@register_method("name")``; one method per file or package.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from vitq.calib.runner import calibrate_in_forward_order
from vitq.config import WEIGHT_ONLY_A_BITS, QuantConfig, ReconConfig, first_error, make
from vitq.errors import VitqError
from vitq.registry import Registry


def _type_name(annotation: Any) -> str:
    """``float``, ``int or null``, ``one of tanq, log2``, ``list of float`` for an option's annotation."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is typing.Annotated:  # FiniteFloat and the like: the type under the constraints
        return _type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


class MethodOptions(BaseModel):
    """A method's options (``QuantConfig.options`` / ``--option KEY=VALUE``): subclass it with one field per
    option, each with its default and a ``description``. Strict: ``true`` is not a number and ``"3"`` not an
    integer; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Paper:
    """The publication a method implements (shown by ``vitq methods``)."""

    title: str
    authors: str
    venue: str
    year: int

    def __str__(self) -> str:
        return f"{self.title} ({self.authors}, {self.venue} {self.year})"


#: the deployment settings the leaderboard adds for the weight-rounding methods and round-to-nearest: W4A8 (4-bit
#: weights on 8-bit integer kernels) and the weight-only W4A16 / W3A16 (activations float)
DEPLOYMENT_SETTINGS: tuple[tuple[int, int], ...] = ((4, 8), (4, WEIGHT_ONLY_A_BITS), (3, WEIGHT_ONLY_A_BITS))


class Method:
    """Base class. The default structure is the papers' convention (docs/protocol.md#what-is-quantized):
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
    #: the calibration-only leaderboard leaves it out (not like-for-like, docs/protocol.md#like-for-like)
    reconstructs: ClassVar[bool] = False
    recon_defaults: ClassVar[dict[str, Any]] = {}
    #: whether ``QuantConfig.outliers`` (vitq.nn.outliers) works with its calibration: a method that rewrites the
    #: weights or swaps the input quantizers of the split layers (RepQ-ViT's fold, GPTQ) says no
    splits_outliers: ClassVar[bool] = False
    #: the method's typed options
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    #: the paper it implements (``None`` for the baselines that have none)
    paper: ClassVar[Paper | None] = None
    #: a method that rewrites the float weights (GPTQ's compensation, ERQ's ridge regression, reconstruction)
    #: names the method with the same quantizers whose weights are rounded to nearest: the sensitivity of one
    #: weight alone is measured there, since the rewritten model has no float weights left to compare against
    round_to_nearest_twin: ClassVar[str | None] = None
    #: one line for ``vitq methods``
    summary: ClassVar[str] = ""

    def __init__(self, config: QuantConfig) -> None:
        self.config = config
        self.options = self.parse_options(config.options)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the method-specific options accepted in ``QuantConfig.options``."""
        return tuple(cls.Options.model_fields)

    @classmethod
    def option_rows(cls) -> list[tuple[str, str, str, str]]:
        """``(name, type, default, description)`` of every option, for ``vitq methods``."""
        rows = []
        for name, info in cls.Options.model_fields.items():
            constraints = [f"{op} {getattr(m, attr)}" for m in info.metadata
                           for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                           if getattr(m, attr, None) is not None]
            rows.append((name, " ".join([_type_name(info.annotation), *constraints]), json.dumps(info.default),
                         info.description or ""))
        return rows

    @classmethod
    def parse_options(cls, given: Mapping[str, Any]) -> MethodOptions:
        """``given`` validated against :attr:`Options`; a bad key or value is one :class:`VitqError` that names the
        valid options."""
        names = cls.option_names()
        valid = f"valid options: {', '.join(names)}" if names else "it takes no options"
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise VitqError(f"method {cls.name!r} has no option(s) {', '.join(unknown)}; {valid}")
        try:
            return cls.Options(**given)
        except ValidationError as err:
            where, message, given = first_error(err)
            got = f" (got {given!r})" if where else ""
            raise VitqError(f"method {cls.name!r} option {where or '(all)'}: {message}{got}; {valid}") from None

    def restructure(self, model: nn.Module) -> None:
        """Change the float architecture in place before it is wrapped (e.g. APHQ-ViT's GELU → ReLU); run again when
        a saved model is rebuilt, so the skeleton matches. Default: nothing."""

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
        settings = make(ReconConfig, **{**self.recon_defaults, **explicit})
        if settings.drop_input and not settings.drop_prob:
            raise VitqError("reconstruction setting drop_input=true needs drop_prob > 0 (the probability of keeping "
                            f"an element float; method {self.name!r} sets none)")
        return settings


def weight_sensitivity_config(config: QuantConfig) -> QuantConfig:
    """The config whose model measures weight sensitivities for ``config``: ``config`` itself, or for a method or a
    reconstruction that rewrites the float weights, its round-to-nearest twin (same bits, overrides and seed)."""
    twin = method_class(config.method).round_to_nearest_twin
    if twin is None and config.reconstruct is None:
        return config
    return config.model_copy(update={"method": twin or config.method, "options": {} if twin else config.options,
                                     "reconstruct": None})


METHODS: Registry[type[Method]] = Registry("method", attribute="name")
#: class decorator: make a method available by name (config, CLI, compare)
register_method = METHODS.register
method_names = METHODS.names
method_class = METHODS.get
