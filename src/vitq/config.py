"""Validated quantization configs.

``QuantConfig`` is what every method receives: the method name, bit widths, calibration size and
seed, method-specific ``options``, and per-point ``overrides`` selected by glob, e.g.

    QuantConfig(method="percentile", w_bits=4, a_bits=4,
                overrides=[PointOverride(pattern="head", bits=8),
                           PointOverride(pattern="blocks.*.attn.softmax", keep_float=True)])

A pattern matches a quantization point (``blocks.3.mlp.fc2``: both its weight and input
quantizers) or one quantizer slot (``blocks.3.mlp.fc2.input_quantizer``).
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from vitq.errors import VitqError
from vitq.quantizers.base import MAX_BITS, MIN_BITS
from vitq.quantizers.registry import quantizer_class, quantizer_kinds
from vitq.targets import TARGETS, target_names

#: what an override's CLI form looks like
OVERRIDE_FORMS = "PATTERN=float, PATTERN=symmetric, PATTERN=BITS or PATTERN=KIND[:BITS]"
#: the largest seed a torch generator takes
MAX_SEED = 2**64 - 1
#: ``a_bits`` of a weight-only setting (W4A16): every activation stays float, as the 16-bit float activations of
#: the weight-only settings deployment papers and runtimes name this way
WEIGHT_ONLY_A_BITS = 16
#: the reconstruction-loss settings of :class:`ReconConfig`, added after it was first saved (left out of dumps while
#: at their defaults); the options are named after their loss (``aphq_eps``: loss ``aphq``)
LOSS_FIELDS = ("loss", "aphq_eps", "aphq_temperature", "aphq_probes", "global_local_weight", "fima_rank",
               "fima_low_rank_share")
#: the other settings of :class:`ReconConfig` added after it was first saved (left out of dumps while at their defaults)
LATER_RECON_FIELDS = ("drop_input", "normalize", "scale_schedule", "preset", "scale_relative")


def _without_new_defaults(model: BaseModel, handler, names: tuple[str, ...]) -> dict[str, Any]:
    """``model`` dumped by pydantic's ``handler``, without the fields ``names`` while they hold their defaults:
    settings added later leave the files and run keys written before them byte for byte the same."""
    data = handler(model)
    for name in names:
        if name in data and getattr(model, name) == type(model).model_fields[name].default:
            del data[name]
    return data


class PointOverride(BaseModel):
    """Change the quantizer of every slot whose point or slot name matches ``pattern``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pattern: str = Field(min_length=1)
    bits: int | None = Field(default=None, ge=MIN_BITS, le=MAX_BITS)
    kind: str | None = None
    keep_float: bool = False
    symmetric: bool = Field(False, description="zero point 0 and signed codes (what integer runtimes' GEMMs take)")

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        return _without_new_defaults(self, handler, ("symmetric",))

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str | None) -> str | None:
        if kind is not None and kind not in quantizer_kinds():
            raise ValueError(f"unknown quantizer kind {kind!r}; known: {', '.join(quantizer_kinds())}")
        return kind

    @classmethod
    def parse(cls, text: str) -> PointOverride:
        """Parse the CLI form ``PATTERN=float``, ``PATTERN=symmetric``, ``PATTERN=BITS``, ``PATTERN=KIND`` or
        ``PATTERN=KIND:BITS``."""
        pattern, sep, value = text.partition("=")
        if not sep or not pattern or not value:
            raise VitqError(f"override {text!r} must look like {OVERRIDE_FORMS}")
        if value in ("float", "symmetric"):
            return make(cls, pattern=pattern, **{"keep_float" if value == "float" else "symmetric": True})
        kind, _, bits = value.rpartition(":") if ":" in value else ("", "", value)
        if not (bits.isascii() and bits.isdigit()):  # "²".isdigit() but int("²") fails
            kind, bits = value, ""
        return make(cls, pattern=pattern, kind=kind or None, bits=int(bits) if bits else None)

    def matches(self, point: str, slot: str) -> bool:
        return fnmatch.fnmatchcase(point, self.pattern) or fnmatch.fnmatchcase(slot, self.pattern)

    def apply(self, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """The quantizer spec after this override (``None`` = float)."""
        if self.keep_float or spec is None:
            return None
        spec = dict(spec)
        if self.kind is not None and self.kind != spec["kind"]:
            # keep the options the new kind also understands (bits, granularity, init, ...)
            new_class = quantizer_class(self.kind)
            accepted = inspect.signature(new_class.__init__).parameters
            spec = {"kind": self.kind, **{k: v for k, v in spec.items() if k in accepted}}
            if getattr(new_class, "fixed_bits", False):  # a float format's name fixes its bits (fp8_e4m3: 8)
                spec.pop("bits", None)
        if self.bits is not None:
            spec["bits"] = self.bits
        if self.symmetric:
            if "symmetric" not in inspect.signature(quantizer_class(spec["kind"]).__init__).parameters:
                raise VitqError(f"override {self.pattern}=symmetric: quantizer kind {spec['kind']!r} has no "
                                "symmetric form (the uniform kinds have)")
            spec.update(symmetric=True, signed=True)
        return spec


class OutlierConfig(BaseModel):
    """Outlier splitting (:mod:`vitq.nn.outliers`): the Linear layers whose input has one of ``roles`` keep their
    outlier input channels (the ``top_k`` widest, or those whose ``max |x|`` exceeds ``threshold``, on the
    calibration images) and the matching weight columns in float."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    top_k: int | None = Field(None, ge=1, description="keep the k channels of largest max |x| float")
    threshold: float | None = Field(None, gt=0, description="keep the channels whose max |x| exceeds it float")
    roles: tuple[str, ...] = Field(("post_ln",), min_length=1, description="input roles of the split layers")

    @model_validator(mode="after")
    def _one_rule(self) -> OutlierConfig:
        if (self.top_k is None) == (self.threshold is None):
            raise ValueError("give exactly one of top_k and threshold")
        return self

    @classmethod
    def parse(cls, text: str) -> OutlierConfig:
        """The CLI form ``top_k=N`` or ``threshold=X``, optionally ``,roles=post_ln+post_gelu``."""
        values: dict[str, Any] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key not in cls.model_fields:
                raise VitqError(f"--outliers {text!r} must look like top_k=N or threshold=X[,roles=R1+R2]")
            values[key] = tuple(value.split("+")) if key == "roles" else value
        return make(cls, **values)


#: named reconstruction budgets (``ReconConfig.preset``): the settings a preset puts under the ones given with it.
#: ``paper``: the released QDrop/APHQ-ViT/FIMA-Q code's budget (with 1024 calibration images: ``--calib-size``)
RECON_PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": {"iterations": 20000, "batch_size": 32, "weight_lr": 1e-3, "scale_schedule": "cosine"},
}


class ReconConfig(BaseModel):
    """Block reconstruction after calibration (:mod:`vitq.calib.recon`; BRECQ/QDrop hyper-parameters, with fewer
    iterations than the papers' 1000 per block so that DeiT-tiny fits a CPU budget, and so a larger AdaRound
    learning rate than their 1e-3, which barely moves the rounding variables in 200 steps: 3e-2 gave the lowest
    stage loss on held-out calibration images of 1e-3 / 1e-2 / 3e-2,
    ``benchmarks/results/recon_stage_lr_holdout.md``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    preset: Literal[tuple(RECON_PRESETS)] = Field(
        "default", description="a named budget whose settings come under the ones given with it (paper: the "
                               "released QDrop/APHQ-ViT code's 20000 iterations, batch 32, AdaRound lr 1e-3, "
                               "cosine step lr; a GPU budget)")
    iterations: int = Field(200, ge=1, description="optimizer steps per stage")
    batch_size: int = Field(16, ge=1, description="calibration images per step")
    weight_lr: float = Field(3e-2, gt=0, description="Adam learning rate of AdaRound's rounding variables")
    scale_lr: float = Field(4e-5, gt=0, description="Adam learning rate of the LSQ activation steps")
    scale_relative: bool = Field(False, description="learn each activation step as the log of its ratio to its "
                                                   "initial value, so that scale_lr changes every step by about the "
                                                   "same fraction per iteration whatever its size and bit width "
                                                   "(false: LSQ's offset in the step's own units)")
    scale_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the steps' learning rate over a stage's iterations: constant, or cosine-annealed "
                                "to 0 (the released QDrop/APHQ-ViT code)")
    round_weight: float = Field(0.01, ge=0, description="weight λ of the rounding regulariser")
    beta: tuple[float, float] = Field((20.0, 2.0), description="β of the regulariser: start and end of its decay")
    warmup: float = Field(0.2, ge=0, lt=1, description="fraction of the steps without the regulariser")
    drop_prob: float = Field(0.0, ge=0, lt=1, description="QDrop: probability of keeping an activation float")
    drop_input: bool = Field(False, description="QDrop: also keep each element of a stage's input at its float "
                                                "value with probability drop_prob (QDrop's released code mixes "
                                                "the quantized model's and the float model's stage inputs so)")
    normalize: bool = Field(False, description="divide a stage's loss by half its value before learning, so that it "
                                               "starts at 2 in every stage and round_weight weighs the same against "
                                               "it everywhere (APHQ-ViT's released code)")
    learn_rounding: bool = Field(True, description="AdaRound the per-row uniform weights")
    learn_steps: bool = Field(True, description="learn the steps of the uniform activation quantizers (LSQ)")
    augment: int = Field(0, ge=0, description="random crop/flip copies added per calibration image")
    unit: Literal["block", "layer"] = Field(
        "block", description="what is fitted to its float output: each stage (BRECQ) or each weight layer (AdaRound)")
    loss: Literal["mse", "fisher", "aphq", "global", "fima"] = Field(
        "mse", description="what a stage minimises (vitq.calib.losses, docs/recon_losses.md): its squared output "
                           "error, weighted by BRECQ's Fisher or APHQ-ViT's Hessian diagonal, or the KL of the "
                           "prediction its output gives through the float rest of the model, or its error under "
                           "FIMA-Q's diagonal plus low-rank Fisher")
    aphq_eps: float = Field(1e-3, gt=0, description="aphq: finite-difference step, relative to the RMS of the "
                                                    "float stage output")
    aphq_temperature: float = Field(20.0, gt=0, description="aphq: temperature of the prediction KL (APHQ-ViT's "
                                                            "released code: 20)")
    aphq_probes: int = Field(1, ge=1, description="aphq: random ±1 perturbation directions per calibration image")
    global_local_weight: float = Field(0.01, ge=0, description="global: weight of the stage's own squared error "
                                                               "added to the prediction KL")
    fima_rank: int = Field(5, ge=0, description="fima: rank of the low-rank part, the top principal directions of "
                                                "the images' KL gradients (FIMA-Q's released configs: 5; 0: the "
                                                "fisher loss)")
    fima_low_rank_share: float = Field(0.5, ge=0, le=1, description="fima: share of the Fisher's trace given to the "
                                                                    "low-rank part, the rest to the diagonal "
                                                                    "(FIMA-Q's released configs weigh the two "
                                                                    "equally)")

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        return _without_new_defaults(self, handler, (*LOSS_FIELDS, *LATER_RECON_FIELDS))

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in RECON_PRESETS:
            return {**RECON_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _input_drop_needs_stages(self) -> ReconConfig:
        # drop_prob > 0 is checked by Method.reconstruction, once the method's own defaults (qdrop: 0.5) are in
        if self.drop_input and self.unit == "layer":
            raise ValueError("drop_input applies to unit='block' only (a layer's float input is not kept)")
        return self

    @field_validator("loss")
    @classmethod
    def _layers_take_mse(cls, loss: str, info: ValidationInfo) -> str:
        if info.data.get("unit") == "layer" and loss != "mse":
            raise ValueError("unit='layer' (one weight layer at a time) takes loss='mse' only")
        return loss

    @field_validator(*LOSS_FIELDS[1:])
    @classmethod
    def _option_of_the_loss(cls, value: Any, info: ValidationInfo) -> Any:
        # given explicitly (defaults are not validated): an option of another loss would silently do nothing
        owner = info.field_name.partition("_")[0]
        if info.data.get("loss") != owner:
            raise ValueError(f"applies to loss={owner!r} only (loss is {info.data.get('loss', 'mse')!r})")
        return value

    def beta_at(self, iteration: int) -> float | None:
        """β of the rounding regulariser at ``iteration`` (``None`` during the warm-up: no regulariser)."""
        start = self.warmup * self.iterations
        if iteration < start:
            return None
        progress = (iteration - start) / max(self.iterations - start, 1)
        return self.beta[1] + (self.beta[0] - self.beta[1]) * max(0.0, 1.0 - progress)


class QuantConfig(BaseModel):
    """Everything that decides how a model is quantized."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field("percentile", min_length=1,
                        description="a registered method name (checked when the method is built: vitq.methods)")
    w_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS)
    a_bits: int = Field(8, description=f"activation bits, {MIN_BITS}..{MAX_BITS}, or {WEIGHT_ONLY_A_BITS}: weight-only "
                                       "(activations float)")
    image_bits: int = Field(8, ge=MIN_BITS, le=MAX_BITS, description="bits of the patch-embedding input")
    calib_size: int = Field(32, ge=1, description="number of calibration images")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="selects the calibration images and seeds the method")
    overrides: list[PointOverride] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict, description="method-specific options")
    reconstruct: ReconConfig | None = Field(None, description="block reconstruction after calibration (None: off)")
    deploy: str | None = Field(None, description="shape the quantizers for a runtime's integer kernels "
                                                 "(vitq.targets: its overrides come before ``overrides``)")
    outliers: OutlierConfig | None = Field(None, description="keep outlier input channels float (None: off)")
    rotate: bool = Field(False, description="rotate the residual stream and attention heads by randomized Hadamard "
                                            "matrices before quantizing (vitq.models.rotation; ViT/DeiT)")

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict[str, Any]:
        return _without_new_defaults(self, handler, ("deploy", "outliers", "rotate"))

    @field_validator("a_bits")
    @classmethod
    def _activation_bits(cls, a_bits: int) -> int:
        if not (MIN_BITS <= a_bits <= MAX_BITS or a_bits == WEIGHT_ONLY_A_BITS):
            raise ValueError(f"activation bits must be {MIN_BITS}..{MAX_BITS}, or {WEIGHT_ONLY_A_BITS} for weight-only "
                             "(activations float)")
        return a_bits

    @property
    def weight_only(self) -> bool:
        """Weights quantized, every activation (the patch-embedding input too) float: ``a_bits == 16``."""
        return self.a_bits == WEIGHT_ONLY_A_BITS

    @field_validator("deploy")
    @classmethod
    def _known_target(cls, deploy: str | None) -> str | None:
        if deploy is not None and deploy not in TARGETS:
            raise ValueError(f"unknown deployment target {deploy!r}; known: {', '.join(target_names())}")
        return deploy

    @property
    def target_overrides(self) -> list[PointOverride]:
        """The overrides of the :attr:`deploy` target (none without one)."""
        return [] if self.deploy is None else [PointOverride.parse(text) for text in TARGETS[self.deploy].overrides]

    def spec_for(self, point: str, slot: str, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        """Apply every matching override, the deployment target's first, in order (later ones win)."""
        for override in [*self.target_overrides, *self.overrides]:
            if override.matches(point, slot):
                spec = override.apply(spec)
        return spec

    @property
    def label(self) -> str:
        if self.method == "float":
            return "float"
        return f"{self.method} W{self.w_bits}A{self.a_bits}" + (f" for {self.deploy}" if self.deploy else "")


def first_error(err: ValidationError) -> tuple[str, str, Any]:
    """Where (dotted field path, ``""`` for the whole model), what and the rejected input of ``err``'s first error."""
    first = err.errors()[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"].removeprefix("Value error, "), first.get("input")


def make(cls: type[BaseModel], **kwargs: Any) -> Any:
    """Build a pydantic model, turning validation errors into one-line :class:`VitqError`."""
    try:
        return cls(**kwargs)
    except ValidationError as err:
        where, message, given = first_error(err)
        raise VitqError(f"invalid {where}: {message} (got {given!r})") from None
