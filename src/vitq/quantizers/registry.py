"""Registry of quantizer kinds, so specs like ``{"kind": "uniform", "bits": 4}`` can be built by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from vitq.errors import VitqError
from vitq.quantizers.base import Quantizer

_QUANTIZERS: dict[str, type[Quantizer]] = {}
Q = TypeVar("Q", bound=type[Quantizer])


def register_quantizer(kind: str) -> Callable[[Q], Q]:
    """Class decorator: make a quantizer buildable by ``kind``."""

    def decorator(cls: Q) -> Q:
        if kind in _QUANTIZERS:
            raise ValueError(f"quantizer kind {kind!r} registered twice")
        cls.kind = kind
        _QUANTIZERS[kind] = cls
        return cls

    return decorator


def quantizer_kinds() -> list[str]:
    return sorted(_QUANTIZERS)


def quantizer_class(kind: str) -> type[Quantizer]:
    try:
        return _QUANTIZERS[kind]
    except KeyError:
        raise VitqError(f"unknown quantizer kind {kind!r}; known: {', '.join(quantizer_kinds())}") from None


def build_quantizer(spec: dict[str, Any]) -> Quantizer:
    """Build an uncalibrated quantizer from a spec dict (``kind``, ``bits`` and kind-specific keys)."""
    spec = dict(spec)
    cls = quantizer_class(spec.pop("kind", None))
    try:
        return cls(**spec)
    except TypeError as err:
        raise VitqError(f"bad options for quantizer {cls.kind!r}: {err}") from None
