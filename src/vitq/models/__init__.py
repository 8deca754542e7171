"""Model-family adapters. Importing this package registers every supported family."""

from vitq.models import timm_beit, timm_cait, timm_eva, timm_swin, timm_swinv2, timm_vit  # noqa: F401  (register the adapter families)
from vitq.models.base import ModelAdapter, Stage
from vitq.models.registry import adapter_by_family, adapter_for, create_model, register_adapter

__all__ = ["ModelAdapter", "Stage", "adapter_by_family", "adapter_for", "create_model", "register_adapter"]
