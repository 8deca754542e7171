"""Each model family's own evaluation preprocessing (timm's data config for timm models)."""

from collections.abc import Callable
from typing import Any

import timm.data
import torch
from PIL import Image


def data_config_for_model(model: torch.nn.Module) -> dict[str, Any]:
    """The model's own timm eval data config (input size, interpolation, crop, mean/std).

    Recorded in reports so that a number can be reproduced with the exact same preprocessing.
    """
    return timm.data.resolve_data_config({}, model=model)


def transform_for_model(model: torch.nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """The eval preprocessing timm uses for ``model`` (e.g. bicubic resize, center crop, normalize)."""
    return timm.data.create_transform(**data_config_for_model(model), is_training=False)
