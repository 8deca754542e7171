"""ImageNet image folders: the supported layouts and the labels of their images.

Class indices always come from the standard ImageNet-1k wnid order shipped with timm, never from the
folders a user happens to have: a validation subset that misses classes would otherwise get shifted
labels and silently wrong accuracies. Four on-disk layouts are understood:

* an ImageFolder tree (``root/n01440764/*.JPEG``, e.g. the class-folder ImageNet ``val/`` tree),
* a flat folder whose file names start with the wnid (``n01440764_tench.JPEG``),
* a flat folder of foolbox-style names ``imagenet_<i>_<label>.jpg`` (label = class index),
* a flat folder of ImageNet validation files ``ILSVRC2012_val_00000001.JPEG`` with a labels file
  (:func:`read_val_labels`): given explicitly, or one of :data:`LABEL_FILES` in the folder.
"""

import csv
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
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})$")
_WNID = re.compile(r"^n\d{8}$")
_INDEX = re.compile(r"^\d+$")

#: labels files of a flat ``ILSVRC2012_val_*`` folder, looked for in the folder itself in this order
LABEL_FILES = ("labels.txt", "val_labels.txt", "LOC_val_solution.csv", "ground_truth.csv")
#: the ImageNet devkit's labels file: 1-based ILSVRC2012_IDs in the devkit's own class order, not ours
DEVKIT_LABELS = "ILSVRC2012_validation_ground_truth.txt"
#: header of Kaggle's ``LOC_val_solution.csv`` (its PredictionString starts with the wnid)
KAGGLE_HEADER = ("ImageId", "PredictionString")


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


def _val_number(path: Path) -> int | None:
    """The number of an ImageNet validation file ``ILSVRC2012_val_00000042.JPEG`` (42), ``None`` otherwise."""
    match = _VAL_NAME.match(path.stem)
    return None if match is None else int(match.group(1))


def _parse_label(text: str, where: str) -> int:
    """Class index of a label: an index 0..999 in the standard sorted-wnid order, or a wnid."""
    if _WNID.match(text):
        index = _wnid_to_index().get(text)
        if index is None:
            raise VitqError(f"{where}: {text!r} is not an ImageNet-1k wnid")
        return index
    if not _INDEX.match(text):
        raise VitqError(f"{where}: {text!r} is not a class index 0..{NUM_CLASSES - 1} or a wnid (n01440764)")
    index = int(text)
    if index >= NUM_CLASSES:
        raise VitqError(f"{where}: label {index} is not a class index 0..{NUM_CLASSES - 1} (1-based "
                        f"ILSVRC2012_IDs such as the devkit's are in another class order and are not accepted)")
    return index


def _read_text(path: Path) -> str:
    if path.name == DEVKIT_LABELS:
        raise VitqError(f"{path} is the ImageNet devkit's ground truth: 1-based ILSVRC2012_IDs in the devkit's "
                        "class order, which cannot be mapped without its meta.mat; give labels as class indices "
                        "0..999 in sorted-wnid order or as wnids (see README)")
    if not path.is_file():
        raise VitqError(f"labels file {path} does not exist")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise VitqError(f"cannot read labels file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise VitqError(f"labels file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _line_labels(path: Path, lines: list[str], images: list[Path]) -> list[int]:
    """Labels of a one-label-per-line file: line i is the label of ``ILSVRC2012_val_{i:08d}``, the i-th file."""
    if len(lines) != len(images):
        raise VitqError(f"labels file {path} has {len(lines)} lines but the folder holds {len(images)} "
                        "ILSVRC2012_val images (one label per line, line i for ILSVRC2012_val_{i:08d})")
    labels = []
    for number, (line, image) in enumerate(zip(lines, images, strict=True), 1):
        if _val_number(image) != number:
            raise VitqError(f"labels file {path} line {number} labels ILSVRC2012_val_{number:08d}, but the "
                            f"folder's file number {number} is {image.name} (for a subset, give a CSV of "
                            "file,label)")
        labels.append(_parse_label(line.strip(), f"labels file {path} line {number}"))
    return labels


def _csv_labels(path: Path, lines: list[str], images: list[Path]) -> list[int]:
    """Labels of a CSV of ``file,label`` rows (optional header; a file named with or without its extension), or
    of Kaggle's ``ImageId,PredictionString`` whose PredictionString starts with the wnid."""
    by_name = {image.name: image for image in images} | {image.stem: image for image in images}
    rows = list(csv.reader(lines))
    first = [field.strip() for field in rows[0]] if rows else []
    kaggle = tuple(first) == KAGGLE_HEADER
    header = kaggle or (len(first) == 2 and not _WNID.match(first[1]) and re.fullmatch(r"[A-Za-z_ ]+", first[1])
                        is not None and first[0] not in by_name)
    found: dict[Path, tuple[int, int]] = {}  # image -> (label, line)
    for number, row in enumerate(rows, 1):
        if header and number == 1:
            continue
        where = f"labels file {path} line {number}"
        fields = [field.strip() for field in row]
        if len(fields) != 2 or not fields[0] or not fields[1]:
            raise VitqError(f"{where}: expected 'file,label', got {lines[number - 1].strip()!r}")
        name, value = fields
        if kaggle:
            value = value.split()[0]
        image = by_name.get(name)
        if image is None:
            raise VitqError(f"{where}: {name!r} is not an image of the folder")
        if image in found:
            raise VitqError(f"{where}: {name!r} is labelled again (first on line {found[image][1]})")
        found[image] = (_parse_label(value, where), number)
    missing = [image.name for image in images if image not in found]
    if missing:
        raise VitqError(f"labels file {path} has no label for {len(missing)} of the folder's {len(images)} "
                        f"images, e.g. {missing[0]}")
    return [found[image][0] for image in images]


def read_val_labels(path: Path, images: list[Path]) -> list[int]:
    """Class indices of the sorted ``ILSVRC2012_val_*`` ``images`` from the labels file ``path``.

    A ``.csv`` file (or one whose first line has a comma) holds ``file,label`` rows, optionally under a header,
    or is Kaggle's ``LOC_val_solution.csv``; any other file holds one label per line, line i for
    ``ILSVRC2012_val_{i:08d}``. A label is a class index 0..999 in the standard sorted-wnid order or a wnid.
    Every image needs exactly one label and every label an image; the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` (1-based IDs in another class order) is refused."""
    text = _read_text(path)
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines
        lines.pop()
    if not lines:
        raise VitqError(f"labels file {path} is empty")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise VitqError(f"labels file {path} line {number} is empty")
    if path.suffix.lower() == ".csv" or "," in lines[0]:
        return _csv_labels(path, lines, images)
    return _line_labels(path, lines, images)


def find_labels_file(root: Path) -> Path | None:
    """The labels file of a flat validation folder: the one of :data:`LABEL_FILES` present in ``root``
    (``None`` without any; several, or the devkit's ground truth alone, is an error)."""
    present = [root / name for name in LABEL_FILES if (root / name).is_file()]
    if len(present) > 1:
        raise VitqError(f"image folder {root} holds several labels files ({', '.join(p.name for p in present)}); "
                        "choose one with --labels")
    if not present and (root / DEVKIT_LABELS).is_file():
        _read_text(root / DEVKIT_LABELS)  # refused, with the reason
    return present[0] if present else None


class ImageNetImages(Dataset):
    """Labelled ImageNet images from a folder, in one of the four supported layouts.

    ``samples`` lists ``(path, class index)`` sorted by path, so the order (and thus any seeded split
    over indices) is the same on every machine. ``layout`` records which layout was detected:
    ``"imagefolder"``, ``"wnid-files"``, ``"foolbox"`` or ``"ilsvrc-val"`` (flat ``ILSVRC2012_val_*`` files
    labelled by ``labels``, or by a labels file found in the folder: :attr:`labels_file`). Images are decoded
    lazily in ``__getitem__``; a corrupt file is reported then, by name.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None,
                 labels: str | Path | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.labels_file: Path | None = None if labels is None else Path(labels)
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
        if labels is not None and self.layout != "ilsvrc-val":
            raise VitqError(f"--labels {labels} applies to a flat folder of ILSVRC2012_val_* images; {self.root} is "
                            f"a {self.layout} folder whose labels come from its names")

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
        val = [path for path in images if _val_number(path) is not None]
        if val and len(val) < len(images):
            other = next(path for path in images if _val_number(path) is None)
            raise VitqError(f"image folder {self.root} mixes ILSVRC2012_val_* files with other names ({other.name})")
        if val:
            if self.labels_file is None:
                self.labels_file = find_labels_file(self.root)
            if self.labels_file is None:
                raise VitqError(f"image folder {self.root} holds ILSVRC2012_val_* images but no labels file: give "
                                f"--labels FILE or put one of {', '.join(LABEL_FILES)} in the folder")
            return "ilsvrc-val", list(zip(images, read_val_labels(self.labels_file, images), strict=True))
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
