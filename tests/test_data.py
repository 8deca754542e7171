"""Tests of vitq.data: layouts and labels, errors, seeded splits, tensor loading."""

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vitq.assets import assets_dir
from vitq.data import (
    ImageNetImages,
    data_config_for_model,
    imagenet_wnids,
    load_tensors,
    split_calib_eval,
    transform_for_model,
)
from vitq.errors import VitqError

TENCH, GOLDFISH, SHARK = "n01440764", "n01443537", "n01484850"


def _write_image(path: Path, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> Path:
    """A tiny synthetic image; the extension picks the format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color=0 if mode == "L" else (200, 30, 60)).save(path)
    return path


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """Minimal transform for tests: fixed size, CHW float in [0, 1]."""
    data = torch.frombuffer(bytearray(img.resize((8, 8)).tobytes()), dtype=torch.uint8)
    return data.reshape(8, 8, 3).permute(2, 0, 1).float() / 255


# ---------------------------------------------------------------- wnids


def test_wnids_are_the_sorted_imagenet_1k_list():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids == sorted(wnids)
    assert wnids[:3] == [TENCH, GOLDFISH, SHARK]
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)


def test_wnids_cache_cannot_be_corrupted_by_caller():
    imagenet_wnids().clear()
    assert len(imagenet_wnids()) == 1000


# ---------------------------------------------------------------- layouts


def test_imagefolder_layout(tmp_path):
    _write_image(tmp_path / GOLDFISH / "b.JPEG")
    _write_image(tmp_path / GOLDFISH / "a.png")
    _write_image(tmp_path / TENCH / "x.jpg")
    _write_image(tmp_path / SHARK / "nested" / "y.webp")
    (tmp_path / TENCH / "notes.txt").write_text("not an image")
    ds = ImageNetImages(tmp_path)
    assert ds.layout == "imagefolder"
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in ds.samples] == [
        (f"{TENCH}/x.jpg", 0),
        (f"{GOLDFISH}/a.png", 1),
        (f"{GOLDFISH}/b.JPEG", 1),
        (f"{SHARK}/nested/y.webp", 2),
    ]
    assert len(ds) == 4


def test_flat_wnid_layout(tmp_path):
    _write_image(tmp_path / f"{GOLDFISH}_goldfish.JPEG")
    _write_image(tmp_path / f"{TENCH}_tench.JPEG")
    _write_image(tmp_path / f"{SHARK}.BMP")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    ds = ImageNetImages(tmp_path)
    assert ds.layout == "wnid-files"
    assert [(p.name, label) for p, label in ds.samples] == [
        (f"{TENCH}_tench.JPEG", 0),
        (f"{GOLDFISH}_goldfish.JPEG", 1),
        (f"{SHARK}.BMP", 2),
    ]


def test_flat_foolbox_layout(tmp_path):
    _write_image(tmp_path / "imagenet_01_559.jpg")
    _write_image(tmp_path / "imagenet_00_243.JPG")
    _write_image(tmp_path / "imagenet_02_0.jpeg")
    ds = ImageNetImages(tmp_path)
    assert ds.layout == "foolbox"
    assert [(p.name, label) for p, label in ds.samples] == [
        ("imagenet_00_243.JPG", 243),
        ("imagenet_01_559.jpg", 559),
        ("imagenet_02_0.jpeg", 0),
    ]


def test_getitem_converts_to_rgb_and_applies_transform(tmp_path):
    _write_image(tmp_path / f"{TENCH}_gray.png", mode="L")
    img, label = ImageNetImages(tmp_path)[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == 0
    tensor, label = ImageNetImages(tmp_path, transform=_to_tensor)[0]
    assert tensor.shape == (3, 8, 8) and label == 0


# ---------------------------------------------------------------- errors


#: (files and folders to create under the root (a trailing "/" makes a folder, "*.txt" a text file, anything else
#: an image), the folder to open relative to the root, the error it must raise)
BAD_FOLDERS = {
    "missing folder": ([], "nope", r"image folder .*nope does not exist"),
    "root is a file": ([f"{TENCH}.jpg"], f"{TENCH}.jpg", "is not a folder"),
    "no images": (["readme.txt"], ".", r"no images \(.*\) found in "),
    "class folder without images": ([f"{TENCH}/"], ".", "no images"),
    "unknown wnid folder": ([f"{TENCH}/a.jpg", "n99999999/b.jpg"], ".", "'n99999999' in .* is not an ImageNet-1k wnid"),
    "non-wnid folder name": (["cats/a.jpg"], ".", "'cats' in .* is not an ImageNet-1k wnid"),
    "unknown wnid file prefix": ([f"{TENCH}_tench.jpg", "n99999999_mystery.jpg"], ".",
                                 "n99999999_mystery.jpg is not an ImageNet-1k wnid"),
    "unparseable file name": (["holiday.jpg"], ".", "cannot tell the class of .*holiday.jpg"),
    "foolbox label out of range": (["imagenet_00_1000.jpg"], ".",
                                   r"label 1000 in .*imagenet_00_1000.jpg is not an ImageNet-1k class index"),
    "mixed naming styles": ([f"{TENCH}_tench.jpg", "imagenet_00_243.jpg"], ".", "mixes file naming styles"),
    "class folders and loose images": ([f"{TENCH}/a.jpg", f"{GOLDFISH}_goldfish.jpg"], ".",
                                       "mixes class sub-folders with loose images"),
}


@pytest.mark.parametrize("entries, root, message", BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_bad_folders_raise_one_clear_error(tmp_path, entries, root, message):
    for entry in entries:
        path = tmp_path / entry
        if entry.endswith("/"):
            path.mkdir(parents=True)
        elif entry.endswith(".txt"):
            path.write_text("no images here")
        else:
            _write_image(path)
    with pytest.raises(VitqError, match=message) as info:
        ImageNetImages(tmp_path / root)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"this is not a jpeg", None], ids=["empty", "garbage", "truncated"])
def test_corrupt_image_raises_on_load(tmp_path, content):
    _write_image(tmp_path / f"{TENCH}_ok.jpg")
    bad = tmp_path / f"{GOLDFISH}_bad.jpg"
    if content is None:
        full = _write_image(tmp_path / "full.jpg", size=(64, 64)).read_bytes()
        (tmp_path / "full.jpg").unlink()
        content = full[: len(full) // 2]
    bad.write_bytes(content)
    ds = ImageNetImages(tmp_path)  # listing does not decode
    ds[0]
    with pytest.raises(VitqError, match=f"cannot read image .*{bad.name}") as info:
        ds[1]
    assert "\n" not in str(info.value)
    with pytest.raises(VitqError, match=bad.name):
        load_tensors(ImageNetImages(tmp_path, transform=_to_tensor), progress=False)


# ---------------------------------------------------------------- split


def test_split_sizes_and_sorted():
    calib, evaluation = split_calib_eval(1000, 32, seed=0)
    assert len(calib) == 32 and len(evaluation) == 968
    assert calib == sorted(calib) and evaluation == sorted(evaluation)
    assert split_calib_eval(1000, 32, seed=1)[0] != calib


def test_split_zero_calibration():
    assert split_calib_eval(5, 0, seed=3) == ([], [0, 1, 2, 3, 4])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_split_properties(n, data, seed):
    calib_size = data.draw(st.integers(0, n - 1))
    calib, evaluation = split_calib_eval(n, calib_size, seed)
    assert len(calib) == calib_size and len(evaluation) == n - calib_size
    assert not set(calib) & set(evaluation)
    assert sorted(calib + evaluation) == list(range(n))
    assert split_calib_eval(n, calib_size, seed) == (calib, evaluation)


@pytest.mark.parametrize(
    ("n", "calib_size", "message"),
    [
        (1000, 2000, "calibration size 2000 is larger than the 1000 images in /data/val"),
        (1000, 1000, "leaving none for evaluation"),
        (10, -1, "must not be negative"),
    ],
)
def test_split_errors(n, calib_size, message):
    with pytest.raises(VitqError, match=re.escape(message)):
        split_calib_eval(n, calib_size, seed=0, source="/data/val")


# ---------------------------------------------------------------- load_tensors


def test_load_tensors_shapes_and_labels(tmp_path):
    for wnid in (TENCH, GOLDFISH, SHARK):
        for i in range(15):
            _write_image(tmp_path / wnid / f"{i:02d}.png", size=(5 + i, 9))
    ds = ImageNetImages(tmp_path, transform=_to_tensor)
    images, labels = load_tensors(ds, progress=False)
    assert images.shape == (45, 3, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 15 + [1] * 15 + [2] * 15
    images, labels = load_tensors(ds, [44, 0, 20], progress=False)
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [2, 0, 1]


def test_load_tensors_nothing_selected(tmp_path):
    _write_image(tmp_path / f"{TENCH}_tench.jpg")
    with pytest.raises(VitqError, match="no images selected"):
        load_tensors(ImageNetImages(tmp_path, transform=_to_tensor), [], progress=False)


# ---------------------------------------------------------------- real assets

SAMPLE = assets_dir() / "imagenet-sample"
FOOLBOX = assets_dir() / "imagenet-foolbox20"
needs_assets = pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"real assets missing: {SAMPLE}")


@pytest.mark.integration
@needs_assets
def test_real_sample_has_one_image_per_class():
    ds = ImageNetImages(SAMPLE)
    assert ds.layout == "wnid-files"
    assert len(ds) == 1000
    assert sorted(label for _, label in ds.samples) == list(range(1000))
    by_name = {path.name: label for path, label in ds.samples}
    assert by_name["n01440764_tench.JPEG"] == 0
    wnids = imagenet_wnids()
    assert all(wnids[label] == path.name[:9] for path, label in ds.samples)


@pytest.mark.integration
@needs_assets
def test_real_foolbox_labels_parsed_from_names():
    ds = ImageNetImages(FOOLBOX)
    assert ds.layout == "foolbox"
    assert len(ds) == 20
    assert all(label == int(path.stem.rsplit("_", 1)[1]) for path, label in ds.samples)
    assert ds.samples[0][0].name == "imagenet_00_243.jpg" and ds.samples[0][1] == 243


@pytest.mark.integration
@needs_assets
def test_real_images_through_deit_tiny_transform():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    cfg = data_config_for_model(model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    ds = ImageNetImages(SAMPLE, transform=transform_for_model(model))
    images, labels = load_tensors(ds, [0, 1, 999], progress=False)
    assert images.shape == (3, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 999]
    foolbox = ImageNetImages(FOOLBOX, transform=transform_for_model(model))
    fool_images, _ = load_tensors(foolbox, [0], progress=False)
    assert fool_images.shape == (1, 3, 224, 224)


# ---------------------------------------------------------------- ImageNet validation layouts


def _val_files(folder: Path, numbers, suffix: str = ".JPEG") -> list[Path]:
    return [_write_image(folder / f"ILSVRC2012_val_{n:08d}{suffix}") for n in numbers]


def test_val_class_folder_tree(tmp_path):
    val = tmp_path / "val"
    _write_image(val / TENCH / "ILSVRC2012_val_00000293.JPEG")
    _write_image(val / TENCH / "ILSVRC2012_val_00002138.JPEG")
    _write_image(val / SHARK / "ILSVRC2012_val_00000001.JPEG")
    ds = ImageNetImages(val)
    assert ds.layout == "imagefolder"
    assert [(p.name, label) for p, label in ds.samples] == [
        ("ILSVRC2012_val_00000293.JPEG", 0), ("ILSVRC2012_val_00002138.JPEG", 0), ("ILSVRC2012_val_00000001.JPEG", 2)]


def test_flat_val_with_one_label_per_line(tmp_path):
    _val_files(tmp_path, range(1, 5))
    (tmp_path / "labels.txt").write_text(f"65\n{SHARK}\n 0 \n999\n\n")  # indices or wnids; trailing blank lines
    ds = ImageNetImages(tmp_path)
    assert ds.layout == "ilsvrc-val" and ds.labels_file == tmp_path / "labels.txt"
    assert [(p.name, label) for p, label in ds.samples] == [
        ("ILSVRC2012_val_00000001.JPEG", 65), ("ILSVRC2012_val_00000002.JPEG", 2),
        ("ILSVRC2012_val_00000003.JPEG", 0), ("ILSVRC2012_val_00000004.JPEG", 999)]


def test_flat_val_with_labels_given_elsewhere(tmp_path):
    _val_files(tmp_path / "val", [1, 2])
    labels = tmp_path / "truth.txt"
    labels.write_text("3\n4\n")
    (tmp_path / "val" / "labels.txt").write_text("7\n8\n")  # the given file wins over the folder's
    ds = ImageNetImages(tmp_path / "val", labels=labels)
    assert [label for _, label in ds.samples] == [3, 4]


def test_flat_val_csv_of_indices_with_header(tmp_path):
    _val_files(tmp_path, [7, 12, 40])  # a subset: rows name their files
    (tmp_path / "ground_truth.csv").write_text(
        "file,label\nILSVRC2012_val_00000040.JPEG,5\nILSVRC2012_val_00000007.JPEG,0\nILSVRC2012_val_00000012,999\n")
    assert [label for _, label in ImageNetImages(tmp_path).samples] == [0, 999, 5]


def test_flat_val_csv_of_wnids(tmp_path):
    _val_files(tmp_path, [2, 1])
    labels = tmp_path / "mine.csv"
    labels.write_text(f"ILSVRC2012_val_00000002,{GOLDFISH}\r\nILSVRC2012_val_00000001.JPEG,{TENCH}\r\n")
    assert [label for _, label in ImageNetImages(tmp_path, labels=labels).samples] == [0, 1]


def test_flat_val_kaggle_solution(tmp_path):
    _val_files(tmp_path, [1, 2])
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000002,{SHARK} 10 20 200 210 {SHARK} 5 5 50 50 \n"
        f"ILSVRC2012_val_00000001,{GOLDFISH} 1 2 3 4 \n")
    ds = ImageNetImages(tmp_path)
    assert ds.layout == "ilsvrc-val" and [label for _, label in ds.samples] == [1, 2]


#: (labels file name, its text, the files of the folder (numbers), the error): every case is one line naming the
#: file (and the line when there is one)
BAD_LABELS = {
    "devkit ground truth": ("ILSVRC2012_validation_ground_truth.txt", "490\n361\n", [1, 2], "devkit.*meta.mat"),
    "label 1000": ("labels.txt", "0\n1000\n", [1, 2], r"labels.txt line 2: label 1000 is not a class index"),
    "negative label": ("labels.txt", "0\n-3\n", [1, 2], r"line 2: '-3' is not a class index"),
    "word label": ("labels.txt", "tench\n0\n", [1, 2], r"line 1: 'tench' is not a class index"),
    "unknown wnid": ("labels.txt", "n99999999\n0\n", [1, 2], r"line 1: 'n99999999' is not an ImageNet-1k wnid"),
    "too few lines": ("labels.txt", "0\n", [1, 2], "has 1 lines but the folder holds 2"),
    "too many lines": ("labels.txt", "0\n1\n2\n", [1, 2], "has 3 lines but the folder holds 2"),
    "lines of a subset": ("labels.txt", "0\n1\n", [1, 3], r"line 2 labels ILSVRC2012_val_00000002.*for a subset"),
    "blank line": ("labels.txt", "0\n\n1\n", [1, 2, 3], "line 2 is empty"),
    "empty file": ("labels.txt", "\n", [1], "is empty"),
    "csv unknown file": ("ground_truth.csv", "ILSVRC2012_val_00000001,0\nILSVRC2012_val_00000009,1\n", [1],
                         r"line 2: 'ILSVRC2012_val_00000009' is not an image"),
    "csv duplicate row": ("ground_truth.csv", "ILSVRC2012_val_00000001,0\nILSVRC2012_val_00000001,0\n", [1, 2],
                          "line 2: .* is labelled again \\(first on line 1\\)"),
    "csv missing image": ("ground_truth.csv", "ILSVRC2012_val_00000001,0\n", [1, 2],
                          "no label for 1 of the folder's 2 images, e.g. ILSVRC2012_val_00000002.JPEG"),
    "csv three fields": ("ground_truth.csv", "ILSVRC2012_val_00000001,0,1\n", [1], "line 1: expected 'file,label'"),
    "csv label 1000": ("ground_truth.csv", "file,label\nILSVRC2012_val_00000001,1000\n", [1], "line 2: label 1000"),
    "kaggle unknown wnid": ("LOC_val_solution.csv", "ImageId,PredictionString\nILSVRC2012_val_00000001,n0 1 2\n",
                            [1], r"line 2: 'n0' is not a class index"),
}


@pytest.mark.parametrize("name, text, numbers, message", BAD_LABELS.values(), ids=BAD_LABELS.keys())
def test_bad_labels_files_raise_one_clear_error(tmp_path, name, text, numbers, message):
    _val_files(tmp_path / "val", numbers)
    labels = tmp_path / name
    labels.write_text(text)
    with pytest.raises(VitqError, match=message) as info:
        ImageNetImages(tmp_path / "val", labels=labels)
    assert "\n" not in str(info.value) and name in str(info.value)


BAD_VAL_FOLDERS = {
    "no labels file": ([], "no labels file: give --labels FILE or put one of labels.txt"),
    "several labels files": (["labels.txt", "val_labels.txt"], "several labels files"),
    "only the devkit's file": (["ILSVRC2012_validation_ground_truth.txt"], "devkit.*meta.mat"),
    "mixed with other names": ([f"{TENCH}_tench.JPEG"], "mixes ILSVRC2012_val_\\* files with other names"),
}


@pytest.mark.parametrize("extra, message", BAD_VAL_FOLDERS.values(), ids=BAD_VAL_FOLDERS.keys())
def test_bad_val_folders_raise_one_clear_error(tmp_path, extra, message):
    _val_files(tmp_path, [1])
    for name in extra:
        if name.endswith(".JPEG"):
            _write_image(tmp_path / name)
        else:
            (tmp_path / name).write_text("0\n")
    with pytest.raises(VitqError, match=message) as info:
        ImageNetImages(tmp_path)
    assert "\n" not in str(info.value)


def test_labels_for_a_folder_named_by_class(tmp_path):
    _write_image(tmp_path / f"{TENCH}_tench.JPEG")
    (tmp_path.parent / "l.txt").write_text("0\n")
    with pytest.raises(VitqError, match="applies to a flat folder of ILSVRC2012_val_"):
        ImageNetImages(tmp_path, labels=tmp_path.parent / "l.txt")
