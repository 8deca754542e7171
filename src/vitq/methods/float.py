"""``float``: no quantization at all: the reference every method is compared with."""

from __future__ import annotations

from vitq.methods.base import Method, register_method


@register_method("float")
class FloatMethod(Method):
    summary = "no quantization: the reference"
    def quantizer_spec(self, role: str) -> None:
        return None

    def calibrate(self, qmodel, images, *, progress: bool = True) -> None:
        return None
