"""Calibration and evaluation data: ImageNet folders, the model's preprocessing, seeded splits."""

from vitq.calib.data import (
    IMAGE_EXTENSIONS,
    ImageNetImages,
    data_config_for_model,
    imagenet_wnids,
    load_tensors,
    split_calib_eval,
    transform_for_model,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageNetImages",
    "data_config_for_model",
    "imagenet_wnids",
    "load_tensors",
    "split_calib_eval",
    "transform_for_model",
]
