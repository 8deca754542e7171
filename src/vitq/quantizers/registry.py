"""Registry of quantizer kinds, so specs like ``{"kind": "uniform", "bits": 4}`` can be built by name."""

from __future__ import annotations

from typing import Any

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer
from vitq.registry import Registry

QUANTIZERS: Registry[type[Quantizer]] = Registry("quantizer kind", attribute="kind")
#: class decorator: make a quantizer buildable by its kind name
register_quantizer = QUANTIZERS.register
quantizer_kinds = QUANTIZERS.names
quantizer_class = QUANTIZERS.get


def build_quantizer(spec: dict[str, Any]) -> Quantizer:
    """Build an uncalibrated quantizer from a spec dict (``kind``, ``bits`` and kind-specific keys)."""
    spec = dict(spec)
    cls = quantizer_class(spec.pop("kind", None))
    try:
        return cls(**spec)
    except TypeError as err:
        raise VitqError(f"bad options for quantizer {cls.kind!r}: {err}") from None
