"""Deployment targets: the quantizer structure a runtime's integer kernels take (``QuantConfig.deploy``,
``--deploy``).

A target is a list of overrides applied before the user's own (so an explicit ``--override`` still wins), plus
integer zero points everywhere: the RepQ-ViT reparameterization (used by ``repq-vit``, ``gptq``, ``erq``,
``dopq-vit``, ``is-vit``) rounds its per-tensor target zero point, which keeps the per-channel equivalence exact
and gives the point an integer form (an unrounded one is a float path in every export).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeployTarget:
    """A runtime's integer-kernel structure: ``overrides`` in the ``--override`` text form."""

    name: str
    overrides: tuple[str, ...]
    summary: str


TARGETS: dict[str, DeployTarget] = {target.name: target for target in (
    DeployTarget("openvino", ("*.weight_quantizer=symmetric", "*attn.q=symmetric", "*attn.k=symmetric", "*attn.v=float",
                        "*attn.softmax=float"),
           "OpenVINO's CPU plugin: symmetric weights (a weight with zero points runs on float weights), symmetric "
           "q and k (the int8 q·kᵀ), v and the softmax output float (as NNCF's transformer preset; quantized they "
           "cost an unfused FakeQuantize), integer zero points"),
    DeployTarget("onnxruntime", (), "onnxruntime's QDQ fusions: integer zero points (u8 activations, s8 weights)"),
)}


def target_names() -> list[str]:
    return sorted(TARGETS)


__all__ = ["TARGETS", "DeployTarget", "target_names"]
