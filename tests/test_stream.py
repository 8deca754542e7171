"""Streamed evaluation against the in-memory path: the same tensors in the same order, the same per-image
results, shards as slices, the bounded image cache, and ``--workers`` through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from helpers import random_test_vit
from PIL import Image
from safetensors.torch import save_file

from vitq.cli import main
from vitq.data import ImageCache, ImageNetImages, image_loader, load_tensors, transform_for_model
from vitq.data.cache import IMAGE_CACHE_ENV, image_cache_budget
from vitq.device import model_device
from vitq.errors import VitqError
from vitq.eval.accuracy import ImageHits, evaluate, evaluate_indices
from vitq.experiment.runs import RunSpec, evaluate_on_split

N_IMAGES = 10


@pytest.fixture(scope="module")
def val(tmp_path_factory, one_thread) -> tuple[torch.nn.Module, Path]:
    """``test_vit`` and a flat ILSVRC2012_val folder of 10 noise images whose ``labels.txt`` makes about half of
    the model's top-1 predictions right (so that hits and misses both occur), the rest of the top-5 mixed."""
    model = random_test_vit()
    folder = tmp_path_factory.mktemp("val")
    generator = torch.Generator().manual_seed(1)
    for i in range(1, N_IMAGES + 1):
        pixels = torch.randint(0, 256, (20 + i, 30, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG")
    (folder / "labels.txt").write_text("0\n" * N_IMAGES)
    images, _ = load_tensors(ImageNetImages(folder, transform_for_model(model)), progress=False)
    with torch.no_grad():
        ranked = model(images).topk(6, dim=1).indices
    labels = [int(ranked[i, (0, 0, 3, 5, 1)[i % 5]]) for i in range(N_IMAGES)]  # top-1, top-1, top-5, miss, top-5
    (folder / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
    return model, folder


def _dataset(model, folder) -> ImageNetImages:
    return ImageNetImages(folder, transform_for_model(model))


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_are_the_in_memory_tensors(val, workers):
    model, folder = val
    dataset = _dataset(model, folder)
    images, labels = load_tensors(dataset, progress=False)
    order = [7, 0, 3, 9, 1]
    batches = list(image_loader(dataset, order, batch_size=2, workers=workers))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b[0] for b in batches]), images[order])
    assert torch.equal(torch.cat([b[1] for b in batches]), labels[order])


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_evaluation_equals_the_in_memory_one(val, workers):
    model, folder = val
    dataset = _dataset(model, folder)
    memory = evaluate(model, load_tensors(dataset, progress=False), batch_size=3, progress=False)
    streamed = evaluate(model, dataset, batch_size=3, workers=workers, progress=False)
    assert 0 < memory.top1 < memory.top5 < 100  # hits and misses both occur
    assert (streamed.top1, streamed.top5, streamed.n_images) == (memory.top1, memory.top5, memory.n_images)
    assert torch.equal(streamed.correct, memory.correct) and torch.equal(streamed.correct5, memory.correct5)
    assert streamed.correct.dtype == torch.bool and streamed.correct5.dtype == torch.bool


def test_a_shard_is_the_slice_of_the_whole(val):
    model, folder = val
    dataset = _dataset(model, folder)
    indices = [9, 2, 4, 5, 8, 0, 1]
    whole = evaluate_indices(model, dataset, indices, batch_size=4, progress=False)
    assert isinstance(whole, ImageHits) and len(whole) == len(indices)
    shards = [evaluate_indices(model, dataset, indices[start::3], batch_size=2, workers=workers, progress=False)
              for start, workers in ((0, 0), (1, 2), (2, 0))]
    for start, shard in enumerate(shards):
        assert torch.equal(shard.top1, whole.top1[start::3]) and torch.equal(shard.top5, whole.top5[start::3])
    # scattered into full-length tensors, the shards sum to the whole (what a distributed evaluation reduces)
    summed = torch.zeros(len(indices), dtype=torch.int64)
    for start, shard in enumerate(shards):
        summed[start::3] += shard.top1
    assert torch.equal(summed.bool(), whole.top1)
    assert torch.equal(ImageHits.cat([evaluate_indices(model, dataset, indices[:3], progress=False),
                                      evaluate_indices(model, dataset, indices[3:], progress=False)]).top5,
                       whole.top5)


def test_indices_of_an_in_memory_pair(val):
    model, folder = val
    dataset = _dataset(model, folder)
    pair = load_tensors(dataset, progress=False)
    assert torch.equal(evaluate(model, pair, indices=[3, 1], progress=False).correct5,
                       evaluate(model, dataset, indices=[3, 1], progress=False).correct5)


def test_cache_within_and_over_its_budget(val):
    model, folder = val
    small = ImageCache(folder, model, progress=False, budget_bytes=3 * 3 * 160 * 160 * 4)  # three images
    assert small.capacity == 3
    assert small.preload([0, 1, 2]) and not small.preload([3, 4, 5])
    dataset, workers = small.stream([0, 1, 2])
    assert workers == 0 and not isinstance(dataset, ImageNetImages)  # the kept tensors, no decoding
    assert small.stream([2, 3]) == (small.dataset, 0)
    images, labels = small.tensors([5, 0, 6, 7])  # over the budget: decoded for this call, not kept
    assert images.shape == (4, 3, 160, 160) and not small.cached([5])
    reference = load_tensors(small.dataset, [5, 0, 6, 7], progress=False)
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])
    # the same split gives the same result cached or streamed
    large = ImageCache(folder, model, progress=False, workers=2)
    split = large.split(2, seed=0)
    assert large.preload(split.calib + split.eval) and large.stream(split.eval)[1] == 0
    spec = RunSpec("test_vit", None, folder, batch_size=3, progress=False, workers=2)
    cached = evaluate_on_split(model, large, split, spec)
    streamed = evaluate_on_split(model, ImageCache(folder, model, progress=False, workers=2, budget_bytes=0),
                                 split, spec)
    assert torch.equal(cached.correct, streamed.correct) and torch.equal(cached.correct5, streamed.correct5)


def test_cache_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv(IMAGE_CACHE_ENV, "3")
    assert image_cache_budget() == 3 * 2**20
    monkeypatch.setenv(IMAGE_CACHE_ENV, "lots")
    with pytest.raises(VitqError, match=f"{IMAGE_CACHE_ENV}='lots' must be a whole number"):
        image_cache_budget()


def test_model_device_of_a_model_without_parameters():
    assert model_device(torch.nn.Identity()) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_a_corrupt_image_in_a_worker_is_one_line(val, tmp_path):
    model, folder = val
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(VitqError) as info:
        evaluate(model, _dataset(model, broken), batch_size=2, workers=2, progress=False)
    assert str(info.value).startswith("cannot read image ") and "\n" not in str(info.value)


def test_workers_and_labels_through_the_cli(val, tmp_path, capsys):
    model, folder = val
    checkpoint = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    labels = tmp_path / "truth.csv"  # the same labels as the folder's labels.txt, as a CSV of wnids
    wnids = timm.data.ImageNetInfo("imagenet-1k").label_names()
    lines = (folder / "labels.txt").read_text().split()
    labels.write_text("".join(f"ILSVRC2012_val_{i:08d}.JPEG,{wnids[int(v)]}\n" for i, v in enumerate(lines, 1)))
    records = []
    for workers, extra in (("0", []), ("2", ["--labels", str(labels)])):
        path = tmp_path / f"w{workers}.json"
        assert main(["eval", "--method", "float", "--model", "test_vit", "--checkpoint", str(checkpoint),
                     "--data", str(folder), "--calib-size", "2", "--batch-size", "3", "--workers", workers,
                     "--no-progress", "--json", str(path), *extra]) == 0, capsys.readouterr().err
        records.append(json.loads(path.read_text()))
    assert records[0]["n_images"] == N_IMAGES - 2
    assert [(r["top1"], r["top5"]) for r in records[1:]] == [(records[0]["top1"], records[0]["top5"])]
    capsys.readouterr()
