"""Calibration and evaluation data: ImageNet folders and their layouts, each model's preprocessing, the seeded
calibration / evaluation split, and decoded images kept in memory."""

from vitq.data.cache import ImageCache, load_tensors
from vitq.data.folders import IMAGE_EXTENSIONS, NUM_CLASSES, ImageNetImages, imagenet_wnids
from vitq.data.split import Split, seeded_split, split_calib_eval
from vitq.data.transforms import data_config_for_model, transform_for_model

__all__ = [
    "IMAGE_EXTENSIONS",
    "NUM_CLASSES",
    "ImageCache",
    "ImageNetImages",
    "Split",
    "data_config_for_model",
    "imagenet_wnids",
    "load_tensors",
    "seeded_split",
    "split_calib_eval",
    "transform_for_model",
]
