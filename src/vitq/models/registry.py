"""Registry of model-family adapters and model construction from timm names / local checkpoints."""

from __future__ import annotations

import difflib
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from vitq.checks import check_finite
from vitq.device import resolve_device
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


def check_model_name(name: object) -> str:
    """``name`` if timm knows it (with its pretrained tag, if one is given), else a one-line error with the
    closest names."""
    import timm
    from timm.models import split_model_name_tag

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


@contextmanager
def _quiet_hub() -> Iterator[None]:
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


def create_model(name: str, checkpoint: str | Path | None = None,
                 device: str | torch.device | None = None) -> nn.Module:
    """A float timm model in eval mode.

    With ``checkpoint`` (a local ``.safetensors`` state dict) the weights are loaded strictly from
    it (every tensor finite); without, timm downloads its pretrained weights (needs a network). The weights are
    loaded on the CPU, then the model is moved to ``device`` (``None``: stays on the CPU).
    """
    import timm

    check_model_name(name)
    if checkpoint is None:
        try:
            with _quiet_hub():
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
    """Load a safetensors state dict into ``model`` strictly (every tensor finite), with readable errors."""
    state = read_state_file(path)
    check_finite(state, f"checkpoint {path}")
    load_state(model, state, path, what)
