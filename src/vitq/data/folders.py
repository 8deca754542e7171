"""ImageNet image folders: the supported layouts and the labels of their images.

Class indices always come from the standard ImageNet-1k wnid order shipped with timm, never from the
folders a user happens to have: a validation subset that misses classes would otherwise get shifted
labels and silently wrong accuracies. Three on-disk layouts are understood:

* an ImageFolder tree (``root/n01440764/*.JPEG``),
* a flat folder whose file names start with the wnid (``n01440764_tench.JPEG``),
* a flat folder of foolbox-style names ``imagenet_<i>_<label>.jpg`` (label = class index).
"""

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import timm.data
from PIL import Image
from torch.utils.data import Dataset

from vitq.errors import VitqError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
NUM_CLASSES = 1000

_WNID_PREFIX = re.compile(r"^(n\d{8})(?!\d)")
_FOOLBOX_NAME = re.compile(r"^imagenet_\d+_(\d+)$")


@cache
def _wnid_tuple() -> tuple[str, ...]:
    """The ImageNet-1k wnids from timm, read once (timm parses a text file on every construction)."""
    return tuple(timm.data.ImageNetInfo("imagenet-1k").label_names())


@cache
def _wnid_to_index() -> dict[str, int]:
    """Map from wnid to class index, for label lookup in O(1)."""
    return {wnid: index for index, wnid in enumerate(_wnid_tuple())}


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in the standard sorted order; class index = position in this list.

    Returns a fresh list so callers cannot corrupt the cached copy.
    """
    return list(_wnid_tuple())


def _is_image(path: Path) -> bool:
    """Whether ``path`` is a file with one of the supported image extensions (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _is_hidden(path: Path) -> bool:
    """Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are never part of a dataset."""
    return path.name.startswith(".")


def _wnid_label(wnid: str, where: Path) -> int:
    """Class index of ``wnid``; ``where`` (the folder or file carrying it) names the problem otherwise."""
    index = _wnid_to_index().get(wnid)
    if index is None:
        raise VitqError(f"{wnid!r} in {where} is not an ImageNet-1k wnid")
    return index


def _flat_file_label(path: Path) -> tuple[str, int]:
    """Layout name and class index of an image in a flat folder, parsed from its file name."""
    foolbox = _FOOLBOX_NAME.match(path.stem)
    if foolbox is not None:
        label = int(foolbox.group(1))
        if label >= NUM_CLASSES:
            raise VitqError(
                f"label {label} in {path} is not an ImageNet-1k class index (0..{NUM_CLASSES - 1})"
            )
        return "foolbox", label
    wnid = _WNID_PREFIX.match(path.name)
    if wnid is not None:
        return "wnid-files", _wnid_label(wnid.group(1), path)
    raise VitqError(
        f"cannot tell the class of {path}: its name neither starts with a wnid (n01440764_...) "
        "nor has the form imagenet_<i>_<label>"
    )


class ImageNetImages(Dataset):
    """Labelled ImageNet images from a folder, in one of the three supported layouts.

    ``samples`` lists ``(path, class index)`` sorted by path, so the order (and thus any seeded split
    over indices) is the same on every machine. ``layout`` records which layout was detected:
    ``"imagefolder"``, ``"wnid-files"`` or ``"foolbox"``. Images are decoded lazily in ``__getitem__``;
    a corrupt file is reported then, by name.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if not self.root.exists():
            raise VitqError(f"image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise VitqError(f"image folder {self.root} is not a folder")
        entries = [entry for entry in self.root.iterdir() if not _is_hidden(entry)]
        subfolders = sorted(entry for entry in entries if entry.is_dir())
        flat_images = sorted(entry for entry in entries if _is_image(entry))
        if subfolders and flat_images:
            raise VitqError(
                f"image folder {self.root} mixes class sub-folders with loose images; use one layout"
            )
        if subfolders:
            self.layout, self.samples = "imagefolder", self._scan_tree(subfolders)
        elif flat_images:
            self.layout, self.samples = self._scan_flat(flat_images)
        else:
            self.layout, self.samples = "empty", []
        if not self.samples:
            raise VitqError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {self.root}")

    @staticmethod
    def _scan_tree(subfolders: list[Path]) -> list[tuple[Path, int]]:
        """Samples of an ImageFolder tree: every image below a wnid-named sub-folder gets its index."""
        samples = []
        for folder in subfolders:
            label = _wnid_label(folder.name, folder)
            for path in folder.rglob("*"):
                hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
                if _is_image(path) and not hidden:
                    samples.append((path, label))
        return sorted(samples)

    def _scan_flat(self, images: list[Path]) -> tuple[str, list[tuple[Path, int]]]:
        """Layout and samples of a flat folder; every file must follow the same naming style."""
        parsed = [(path, *_flat_file_label(path)) for path in images]
        layouts = sorted({layout for _, layout, _ in parsed})
        if len(layouts) > 1:
            raise VitqError(f"image folder {self.root} mixes file naming styles: {', '.join(layouts)}")
        return layouts[0], [(path, label) for path, _, label in parsed]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """The image (RGB, then ``transform``-ed if a transform was given) and its class index."""
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise VitqError(f"cannot read image {path}: {reason}") from exc
        return (self.transform(rgb) if self.transform is not None else rgb), label
