"""A small name → class registry, shared by quantizer kinds, methods and model families.

    QUANTIZERS = Registry("quantizer kind", attribute="kind")

    @QUANTIZERS.register("uniform")
    class UniformQuantizer(Quantizer): ...

Registering sets the class attribute (``kind`` here) to the name, so a class knows its own key; looking
up an unknown name raises a :class:`~vitq.errors.VitqError` that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from vitq.errors import VitqError

C = TypeVar("C", bound=type)


class Registry(Generic[C]):
    def __init__(self, what: str, attribute: str) -> None:
        self.what = what
        self.attribute = attribute
        self._classes: dict[str, C] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register ``cls`` under ``name``."""

        def decorator(cls: C) -> C:
            if name in self._classes:
                raise ValueError(f"{self.what} {name!r} registered twice")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[C]:
        return list(self._classes.values())

    def get(self, name: str) -> C:
        try:
            return self._classes[name]
        except KeyError:
            raise VitqError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None
