"""Registry of model-family adapters and model construction from timm names / local checkpoints."""

from __future__ import annotations

import difflib
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from vitq.device import resolve_device
from vitq.errors import VitqError
from vitq.models.base import ModelAdapter
from vitq.models.hf import create_hf_architecture, is_hf_name, load_hf_model
from vitq.models.weights import load_state_dict_file, quiet_hub
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


def check_model_name(name: object) -> str:
    """``name`` if timm knows it (with its pretrained tag, if one is given) or it names a transformers checkpoint
    (``hf:<folder or hub name>``, :mod:`vitq.models.hf`), else a one-line error with the closest names."""
    import timm
    from timm.models import split_model_name_tag

    if is_hf_name(name):
        return name
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise VitqError(f"unknown model {name!r}{hint}")
    base, tag = split_model_name_tag(name)
    if tag:
        known = [n.partition(".")[2] for n in timm.list_pretrained(base)]
        if tag not in known:
            raise VitqError(f"model {name!r} has an unknown pretrained tag {tag!r}; "
                            f"{base} has: {', '.join(known) or 'none'}")
    return name


def create_model(name: str, checkpoint: str | Path | None = None,
                 device: str | torch.device | None = None) -> nn.Module:
    """A float timm model in eval mode.

    With ``checkpoint`` (a local ``.safetensors`` state dict) the weights are loaded strictly from
    it (every tensor finite); without, timm downloads its pretrained weights (needs a network). An ``hf:`` name
    reads a transformers checkpoint into the equivalent timm model (:mod:`vitq.models.hf`). The weights are
    loaded on the CPU, then the model is moved to ``device`` (``None``: stays on the CPU).
    """
    import timm

    check_model_name(name)
    if is_hf_name(name):
        if checkpoint is not None:
            raise VitqError(f"{name} reads its weights from its own folder: drop --checkpoint")
        model = load_hf_model(name)
    elif checkpoint is None:
        try:
            with quiet_hub():
                model = timm.create_model(name, pretrained=True)
        except Exception as err:  # network or hub failures come in many exception types
            raise VitqError(f"could not download pretrained weights for {name!r} ({type(err).__name__}); "
                            "pass --checkpoint with a local .safetensors file") from None
    else:
        model = timm.create_model(name, pretrained=False)
        load_state_dict_file(model, checkpoint, what=f"model {name!r}")
    if device is not None:
        model.to(resolve_device(device))
    return model.eval()


def create_architecture(name: str, device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised timm model in eval mode: the structure only, nothing is downloaded.
    ``device="meta"`` builds it without allocating its tensors (shapes only, for checks)."""
    import timm

    check_model_name(name)
    # no device context by default: it would route every op of timm's init through a torch function mode
    with nullcontext() if device is None else torch.device(device):
        if is_hf_name(name):
            return create_hf_architecture(name)
        return timm.create_model(name, pretrained=False).eval()


