"""An image processor's evaluation preprocessing as a timm data config."""

from __future__ import annotations

import math
from typing import Any

from vitq.errors import VitqError

#: PIL resampling codes used by the image processors -> timm interpolation names
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
#: the image processors' defaults where a folder has no preprocessor_config.json (ViTImageProcessor's; its size is
#: the model's image size)
_DEFAULT_PROCESSOR = {"do_resize": True, "resample": 2, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5]}



#: image processors that read a plain-number ``size`` as the shortest edge (the others, ViT's among them, as a square)
_INT_SIZE_IS_SHORTEST_EDGE = frozenset({"CLIPImageProcessor", "BitImageProcessor", "ConvNextImageProcessor",
                                        "LevitImageProcessor", "PoolFormerImageProcessor"})


def _processor_type(processor: dict) -> str:
    """The processor's class name without transformers' ``Fast``/``Pil`` variants (``FeatureExtractor`` in older
    configs)."""
    name = processor.get("image_processor_type") or processor.get("feature_extractor_type") or ""
    return name.removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")


def data_config(processor: dict, source: str, image_size: int) -> dict[str, Any]:
    """The timm data config (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``) that
    reproduces an image processor's evaluation preprocessing (see the module notes); without a processor file,
    ViTImageProcessor's defaults at the model's ``image_size``."""
    processor = {**_DEFAULT_PROCESSOR, "size": {"height": image_size, "width": image_size}, **processor}
    factor = processor.get("rescale_factor", 1 / 255)
    if not processor.get("do_rescale", True) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise VitqError(f"{source}: only images rescaled by 1/255 are supported (rescale_factor {factor})")
    if not processor.get("do_resize", True):
        raise VitqError(f"{source}: an image processor without resizing is not supported")
    size = processor.get("size")
    if isinstance(size, int):  # an older config's plain number: what it means depends on the processor
        size = {"shortest_edge": size} if _processor_type(processor) in _INT_SIZE_IS_SHORTEST_EDGE else \
            {"height": size, "width": size}
    crop = processor.get("crop_size") if processor.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if isinstance(size, dict) and "shortest_edge" in size:
        resize, mode = size["shortest_edge"], "center"
        if "crop_pct" in processor and crop is None:  # ConvNeXt's processor: resize to edge/crop_pct, crop edge
            crop, resize = {"height": resize, "width": resize}, math.floor(resize / processor["crop_pct"])
    elif isinstance(size, dict) and size.get("height") == size.get("width") and size.get("height"):
        resize, mode = size["height"], "squash"
    else:
        raise VitqError(f"{source}: image size {size!r} is not supported (a square {{height, width}} or "
                        "{shortest_edge})")
    if crop is not None and crop.get("height") != crop.get("width"):
        raise VitqError(f"{source}: crop size {crop!r} is not square")
    side = resize if crop is None else crop["height"]
    resample = processor.get("resample", 2)
    if resample not in RESAMPLE:
        raise VitqError(f"{source}: resampling filter {resample!r} is not supported "
                        f"({', '.join(f'{k} ({v})' for k, v in RESAMPLE.items())})")
    normalize = processor.get("do_normalize", True)
    crop_pct = side / resize
    while math.floor(side / crop_pct) < resize:  # timm resizes to floor(side / crop_pct): undo the division's rounding
        crop_pct = math.nextafter(crop_pct, 0.0)
    return {"input_size": (3, side, side), "interpolation": RESAMPLE[resample], "crop_pct": crop_pct,
            "crop_mode": mode, "mean": tuple(processor["image_mean"]) if normalize else (0.0, 0.0, 0.0),
            "std": tuple(processor["image_std"]) if normalize else (1.0, 1.0, 1.0)}
