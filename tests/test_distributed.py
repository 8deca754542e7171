"""Data-parallel evaluation: the sharding math, and the process-group pieces in real gloo processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import self_labelled_folder
from hypothesis import given
from hypothesis import strategies as st

from vitq import distributed
from vitq.cli import main
from vitq.distributed import Context, shard


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("count", [0, 1, 4, 7, 10, 23])
def test_shards_cover_every_index_exactly_once(world, count):
    indices = list(range(100, 100 + 3 * count, 3))  # not 0..n-1: shards hold items, not positions
    shards = [shard(indices, rank, world) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == indices
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(s) for s in shards] == sorted((len(s) for s in shards), reverse=True)


@given(st.lists(st.integers(), max_size=60), st.integers(1, 9))
def test_shard_positions_interleave(items, world):
    for rank in range(world):
        assert shard(items, rank, world) == [items[p] for p in range(rank, len(items), world)]


def test_shard_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError):
        shard([1, 2], 2, 2)


def test_one_process_context_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = distributed.init("cpu")
    assert context == Context() and not context.distributed and context.is_main
    hits = torch.tensor([True, False, True])
    assert distributed.gather_hits(hits, 3, context) is hits
    assert distributed.broadcast_bytes(b"abc", context) == b"abc"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from helpers import random_images, random_test_vit

    import vitq

    context = distributed.init("cpu")
    try:
        total = 7
        mine = shard(list(range(total)), context.rank, context.world_size)
        hits = torch.tensor([i % 3 == 0 for i in mine])
        full = distributed.gather_hits(hits, total, context)
        images = random_images(3)
        qmodel = None
        if context.is_main:
            config = vitq.QuantConfig(method="percentile", w_bits=4, a_bits=4, calib_size=2)
            qmodel = vitq.quantize(random_test_vit(), config, images[:2], progress=False)
        qmodel = distributed.broadcast_model(qmodel, context)
        with torch.no_grad():
            logits = qmodel(images)
        results.put((context.rank, full.tolist(), logits.numpy().tobytes()))
    finally:
        distributed.close(context)


def test_two_gloo_processes_gather_hits_and_share_rank_zeros_model():
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, _free_port(), results), nprocs=2, join=True, start_method="spawn")
    got = dict((rank, (full, logits)) for rank, full, logits in (results.get() for _ in range(2)))
    expected = [i % 3 == 0 for i in range(7)]
    assert got[0][0] == got[1][0] == expected
    assert got[0][1] == got[1][1]  # the broadcast model computes exactly what rank 0's does


# ---------------------------------------------------------------- vitq eval under torchrun

N_IMAGES, CALIB = 9, 2  # 7 evaluation images: two processes do not divide them


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    checkpoint, data = self_labelled_folder(tmp_path_factory.mktemp("torchrun"), N_IMAGES)
    return ["--model", "test_vit", "--checkpoint", str(checkpoint), "--data", str(data), "--no-progress",
            "--workers", "0", "--threads", "1"]


def _torchrun_eval(args: list[str], json_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vitq", *args, "--json", str(json_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _same_result(one_path, two_path) -> None:
    one, two = (json.loads(path.read_text()) for path in (one_path, two_path))
    assert two["processes"] == 2 and one["processes"] == 1
    assert (two["n_images"], two["top1"], two["top5"]) == (one["n_images"], one["top1"], one["top5"])
    assert one["n_images"] == N_IMAGES - CALIB and 0 < one["top1"] < 100  # a count that could differ


def test_torchrun_two_processes_print_the_one_process_result(files, tmp_path):
    """Rank 0 calibrates and shares its model, each rank evaluates its shard, the summed counts are the
    one-process counts (each image once), and only rank 0 writes the JSON."""
    args = ["eval", "--method", "percentile", "--w-bits", "4", "--a-bits", "4", "--calib-size", str(CALIB), *files]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    done = _torchrun_eval(args, tmp_path / "two.json")
    _same_result(tmp_path / "one.json", tmp_path / "two.json")
    assert done.stdout.count("top-1") == 1  # rank 0 alone prints


def test_torchrun_evaluates_a_saved_model_like_one_process(files, tmp_path):
    """With ``--quantized DIR`` every rank reads the saved model itself; the result is still the one-process one."""
    saved = tmp_path / "saved"
    assert main(["quantize", "--method", "percentile", "--w-bits", "4", "--a-bits", "4", "--calib-size", str(CALIB),
                 *files, "--output", str(saved)]) == 0
    args = ["eval", "--quantized", str(saved), *files]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    _torchrun_eval(args, tmp_path / "two.json")
    _same_result(tmp_path / "one.json", tmp_path / "two.json")


def test_only_eval_runs_under_torchrun(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["quantize", "--method", "minmax", "--calib-size", str(CALIB), *files, "--output", str(tmp_path / "q")])
    assert code == 2 and "only 'vitq eval' runs data-parallel" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
