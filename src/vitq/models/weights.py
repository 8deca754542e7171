"""Reading model weights: safetensors state dicts loaded strictly with one-line errors, and a quiet hub client."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from vitq.checks import check_finite
from vitq.errors import VitqError


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence the hub clients' retry warnings (one per attempt without a network): the failure is reported once."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3", "timm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def read_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with readable errors (never unpickles)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VitqError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise VitqError(f"checkpoint {path} is not a .safetensors file (vitq never unpickles files)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise VitqError(f"cannot read checkpoint {path}: {err}") from None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load ``state`` (read from ``path``) into ``model`` strictly, with readable errors."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).strip().splitlines()[-1].strip()
        raise VitqError(f"checkpoint {path} does not match {what}: {first}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise VitqError(f"checkpoint {path} does not match {what}: {'; '.join(problems)}")


def load_state_dict_file(model: nn.Module, path: str | Path, what: str,
                         convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> None:
    """Load a safetensors state dict into ``model`` strictly (every tensor finite), with readable errors;
    ``convert`` maps the file's tensors to ``model``'s keys first (e.g. a transformers checkpoint to timm's)."""
    state = read_state_file(path)
    check_finite(state, f"checkpoint {path}")
    load_state(model, state if convert is None else convert(state), path, what)


__all__ = ["load_state", "load_state_dict_file", "quiet_hub", "read_state_file"]
