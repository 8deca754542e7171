"""Where the real pretrained weights and ImageNet images live.

The project never ships these files; it references them. The location is ``$VITQ_ASSETS`` or,
by default, ``../shared/assets`` relative to the current working directory.
"""

import os
from pathlib import Path

DEFAULT_ASSETS = Path("../shared/assets")
DEIT_TINY_CHECKPOINT = "deit_tiny_patch16_224.safetensors"
IMAGENET_SAMPLE = "imagenet-sample"


def assets_dir() -> Path:
    """The assets folder: ``$VITQ_ASSETS`` if set, else ``../shared/assets``."""
    return Path(os.environ.get("VITQ_ASSETS", DEFAULT_ASSETS))
