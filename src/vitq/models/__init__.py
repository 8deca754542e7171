"""Model-family adapters. Importing this package registers every supported family."""

from vitq.models import (  # noqa: F401  (register the adapter families)
    timm_beit,
    timm_cait,
    timm_convit,
    timm_efficientvit_mit,
    timm_efficientvit_msra,
    timm_eva,
    timm_levit,
    timm_mobilevit,
    timm_pit,
    timm_swin,
    timm_swinv2,
    timm_tinyvit,
    timm_vit,
    timm_xcit,
)
from vitq.models.base import ModelAdapter, Stage
from vitq.models.registry import adapter_by_family, adapter_for, create_model, register_adapter

__all__ = ["ModelAdapter", "Stage", "adapter_by_family", "adapter_for", "create_model", "register_adapter"]
