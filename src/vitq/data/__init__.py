"""Calibration and evaluation data: ImageNet folders and their layouts, each model's preprocessing, the seeded
calibration / evaluation split, decoded images kept in memory (within a budget) or streamed by a DataLoader."""

from vitq.data.cache import ImageCache, load_tensors
from vitq.data.folders import (
    IMAGE_EXTENSIONS,
    LABEL_FILES,
    NUM_CLASSES,
    ImageNetImages,
    imagenet_wnids,
    read_val_labels,
)
from vitq.data.loader import default_workers, image_loader
from vitq.data.split import Split, seeded_split, split_calib_eval
from vitq.data.transforms import data_config_for_model, transform_for_model

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_FILES",
    "NUM_CLASSES",
    "ImageCache",
    "ImageNetImages",
    "Split",
    "data_config_for_model",
    "default_workers",
    "image_loader",
    "imagenet_wnids",
    "load_tensors",
    "read_val_labels",
    "seeded_split",
    "split_calib_eval",
    "transform_for_model",
]
