"""Shared fixtures: the real DeiT-tiny and ImageNet sample (skipped when the assets are missing)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import random_test_vit

from vitq.assets import DEIT_TINY_CHECKPOINT, IMAGENET_SAMPLE, assets_dir

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker process gets one intra-op thread, so that N workers share the cores instead of
    # oversubscribing them (a test that needs more threads sets them itself)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def assets():
    path = assets_dir()
    if not (path / DEIT_TINY_CHECKPOINT).is_file() or not (path / IMAGENET_SAMPLE).is_dir():
        pytest.skip(f"real assets not found in {path} (set VITQ_ASSETS)")
    return path


@pytest.fixture(scope="session")
def deit_tiny(assets):
    import vitq

    return vitq.create_model("deit_tiny_patch16_224", checkpoint=assets / DEIT_TINY_CHECKPOINT)


@pytest.fixture(scope="session")
def sample_tensors(assets, deit_tiny) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1000 sample images preprocessed with DeiT-tiny's timm transform, and their labels."""
    from vitq.data import ImageNetImages, load_tensors, transform_for_model

    dataset = ImageNetImages(assets / IMAGENET_SAMPLE, transform_for_model(deit_tiny))
    return load_tensors(dataset, progress=False)


@pytest.fixture(scope="session")
def split_indices_seed0(sample_tensors) -> tuple[list[int], list[int]]:
    """(calibration indices, evaluation indices) of the default 32/968 split, seed 0."""
    from vitq.data import split_calib_eval

    return split_calib_eval(len(sample_tensors[0]), 32, seed=0)


@pytest.fixture(scope="session")
def split_seed0(sample_tensors, split_indices_seed0):
    """(calibration images, (eval images, eval labels)) for the default 32/968 split, seed 0."""
    images, labels = sample_tensors
    calib_idx, eval_idx = split_indices_seed0
    return images[calib_idx], (images[eval_idx], labels[eval_idx])


@pytest.fixture(scope="session")
def float_result_all(deit_tiny, sample_tensors):
    """Float DeiT-tiny on all 1000 sample images: the one float evaluation every real-model test shares."""
    import vitq

    return vitq.evaluate(deit_tiny, sample_tensors, progress=False)


@pytest.fixture(scope="session")
def float_top1_seed0(float_result_all, split_indices_seed0) -> float:
    """Float top-1 (%) on the seed-0 evaluation images, read from the all-image evaluation."""
    return 100 * float_result_all.correct[split_indices_seed0[1]].float().mean().item()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float_model() -> torch.nn.Module:
    """timm's tiny random-init ``test_vit`` (seed 0), rebuilt per test module so none sees another's changes."""
    return random_test_vit()
