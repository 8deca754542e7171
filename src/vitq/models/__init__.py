"""Model-family adapters. Importing this package registers every supported family."""

from vitq.models import timm_swin, timm_vit  # noqa: F401  (register the "swin" and "vit" families)
from vitq.models.base import ModelAdapter, Stage
from vitq.models.registry import adapter_by_family, adapter_for, create_model, register_adapter

__all__ = ["ModelAdapter", "Stage", "adapter_by_family", "adapter_for", "create_model", "register_adapter"]
