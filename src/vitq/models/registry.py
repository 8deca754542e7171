"""Registry of model-family adapters and model construction from timm names / local checkpoints."""

from __future__ import annotations

import difflib
from pathlib import Path

import torch
from torch import nn

from vitq.errors import VitqError
from vitq.models.base import ModelAdapter
from vitq.registry import Registry

ADAPTERS: Registry[type[ModelAdapter]] = Registry("model family", attribute="family")
#: class decorator: register a model-family adapter
register_adapter = ADAPTERS.register
adapter_by_family = ADAPTERS.get


def adapter_for(model: nn.Module) -> type[ModelAdapter]:
    """The adapter of the family ``model`` belongs to."""
    for adapter in ADAPTERS.classes():
        if adapter.matches(model):
            return adapter
    raise VitqError(f"no vitq adapter for model class {type(model).__name__}; "
                    f"supported families: {', '.join(ADAPTERS.names())}")


def create_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """A float timm model in eval mode.

    With ``checkpoint`` (a local ``.safetensors`` state dict) the weights are loaded strictly from
    it; without, timm downloads its pretrained weights (needs a network).
    """
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VitqError(f"unknown model {name!r}{hint}")
    if checkpoint is None:
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as err:  # network or hub failures come in many exception types
            raise VitqError(f"could not download pretrained weights for {name!r} ({type(err).__name__}); "
                            "pass --checkpoint with a local .safetensors file") from None
    else:
        model = timm.create_model(name, pretrained=False)
        load_state_dict_file(model, checkpoint, what=f"model {name!r}")
    return model.eval()


def create_architecture(name: str) -> nn.Module:
    """A randomly initialised timm model in eval mode: the structure only, nothing is downloaded."""
    import timm

    if not timm.is_model(name):
        create_model(name)  # raises the "unknown model ..., did you mean ...?" error first
    return timm.create_model(name, pretrained=False).eval()


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


def load_state_dict_file(model: nn.Module, path: str | Path, what: str) -> None:
    """Load a safetensors state dict into ``model`` strictly, with readable errors."""
    load_state(model, read_state_file(path), path, what)
