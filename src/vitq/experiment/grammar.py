"""The small grammar of experiment descriptions: ``KEY=VALUE`` options, comma lists, ``WxAy`` bit settings and
method variants such as ``dopq-vit[softmax=log2;target=mean]``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitq.config import MAX_SEED
from vitq.errors import VitqError

#: the label of the float baseline in every comparison
FLOAT = "float"

_BITS = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)
_VARIANT = re.compile(r"^([^\[\]]+)(?:\[(.*)\])?$", re.DOTALL)


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as JSON when possible (``3``, ``0.5``, ``true``, ``[1, 2]``), else text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise VitqError(f"option {text!r} must look like KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split on ``sep`` outside square brackets: ``a[x=1,y=2],b`` -> ``["a[x=1,y=2]", "b"]``."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == sep and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def parse_list(text: str, what: str) -> list[str]:
    """The non-empty comma-separated items of ``--what`` (commas inside brackets do not split), deduplicated."""
    items = [item.strip() for item in split_top_level(text, ",") if item.strip()]
    if not items:
        raise VitqError(f"--{what} is empty")
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class Variant:
    """One ``--methods`` item: a method with its own options, shown in the report as ``label``."""

    label: str
    method: str
    options: dict[str, Any]


def _balanced(text: str) -> bool:
    """Whether every ``[`` in ``text`` is closed by a later ``]`` and no ``]`` comes unopened."""
    depth = 0
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def parse_variant(item: str) -> Variant:
    """``dopq-vit[softmax=log2;target=mean]`` -> ``dopq-vit`` with those options (parsed like ``--option``).

    The label is the item without whitespace (``percentile[]`` is just ``percentile``).
    """
    text = "".join(item.split())
    match = _VARIANT.match(text)
    if match is None or not _balanced(match.group(2) or ""):
        raise VitqError(f"--methods item {item!r} must look like METHOD or METHOD[KEY=VALUE;KEY=VALUE...]")
    method, body = match.groups()
    if not body:
        return Variant(method, method, {})
    try:
        pairs = [parse_option(part) for part in split_top_level(body, ";")]
    except VitqError as err:
        raise VitqError(f"--methods item {item!r}: {err}") from None
    if len({key for key, _ in pairs}) != len(pairs):
        raise VitqError(f"--methods item {item!r} gives an option twice")
    return Variant(text, method, dict(pairs))


def parse_variants(text: str) -> list[Variant]:
    """The ``--methods`` variants, one per distinct label, in order; ``float`` is not allowed."""
    variants: dict[str, Variant] = {}
    for item in parse_list(text, "methods"):
        variant = parse_variant(item)
        variants.setdefault(variant.label, variant)
    if any(v.method == FLOAT for v in variants.values()):
        raise VitqError("--methods must not list float: the float model is always evaluated as the baseline")
    return list(variants.values())


def parse_reference(text: str | None, variants: Sequence[Variant]) -> str | None:
    """The ``--reference`` label (whitespace removed), which must be one of the variants' labels."""
    if text is None:
        return None
    label, labels = "".join(text.split()), [v.label for v in variants]
    if label not in labels:
        raise VitqError(f"--reference {text!r} is not one of the --methods labels: {', '.join(labels)}")
    return label


def parse_bits(text: str) -> tuple[int, int]:
    """``W4A8`` -> ``(4, 8)``."""
    match = _BITS.match(text)
    if match is None:
        raise VitqError(f"bit setting {text!r} must look like W8A8 (weight bits, activation bits)")
    return int(match.group(1)), int(match.group(2))


def parse_seed(text: str) -> int:
    """A seed: an integer in ``0 .. 2^64 - 1`` (what a torch generator takes)."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_SEED:
        raise VitqError(f"seed {text!r} must be an integer from 0 to {MAX_SEED}")
    return int(text)
