"""Data-parallel evaluation on ``torch.distributed``: ``torchrun --nproc-per-node N -m vitq eval ...``.

Under torchrun (``WORLD_SIZE`` > 1 in the environment) each process joins one process group (gloo on the CPU,
nccl on CUDA, one GPU per local rank). The evaluation images are sharded by position: rank ``r`` of ``N`` takes
every ``N``-th image from ``r`` (:func:`shard`), so every image is evaluated exactly once whatever ``N`` and the
image count; the per-image hits are scattered into full-length vectors and summed across ranks, which gives
exactly the one-process result (same correct counts, same per-image order).

Every rank must evaluate the same quantized model. Rank 0 calibrates and the others receive its model
(:func:`broadcast_model`), rather than every rank calibrating deterministically: calibration is deterministic
for one device and thread count, but ranks on other hosts or GPU models may round a near-tie differently, and
the result must not depend on where a rank runs. The model travels as vitq's own checkpoint bytes (safetensors
with float weights, validated on load like any saved model: nothing is unpickled). Only rank 0 prints and writes
files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from vitq.errors import VitqError

#: how long a rank waits for the others, e.g. for rank 0's calibration with block reconstruction (hours on big
#: models); torch's default (10 minutes for nccl) would kill a long calibration
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` (1: no process group) and its device."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (or any launcher setting ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> Context:
    """Join the process group when launched by torchrun, else a one-process context on ``device``.

    ``device`` is the resolved ``--device``: on CUDA each rank takes the GPU of its local rank (``cuda:LOCAL_RANK``,
    so ``--device cuda`` or ``auto`` means one GPU per process); a fixed ``cuda:N`` would put every rank on one
    GPU and is refused."""
    if not launched_by_torchrun():
        return Context(device=device)
    rank, world, local = (int(os.environ.get(key, "0")) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        if local >= count:
            raise VitqError(f"local rank {local} has no GPU of its own ({count} CUDA device(s)); start at most "
                            f"{count} processes per node")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo", timeout=TIMEOUT)
    return Context(rank=rank, world_size=world, device=device)


def close(context: Context) -> None:
    """Leave the process group (a no-op for one process)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The items of ``indices`` that rank ``rank`` of ``world_size`` evaluates: positions ``rank``,
    ``rank + world_size``, ... Together the ranks cover every item exactly once (the last ranks get one item
    fewer when ``world_size`` does not divide the count)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    return list(indices[rank::world_size])


def gather_hits(hits: torch.Tensor, total: int, context: Context) -> torch.Tensor:
    """The full ``[total]`` per-image vector from every rank's shard ``hits`` (rank ``r`` holds positions
    ``r, r + N, ...`` as in :func:`shard`): each rank scatters its own into zeros and the vectors are summed."""
    if not context.distributed:
        return hits
    full = torch.zeros(total, dtype=torch.int64, device=context.device)
    full[context.rank::context.world_size] = hits.to(device=context.device, dtype=torch.int64)
    dist.all_reduce(full, op=dist.ReduceOp.SUM)
    return full.cpu().to(hits.dtype)


def broadcast_bytes(data: bytes | None, context: Context) -> bytes:
    """``data`` of rank 0 on every rank (the other ranks pass ``None``)."""
    if not context.distributed:
        assert data is not None
        return data
    size = torch.tensor([len(data) if context.is_main else 0], dtype=torch.int64, device=context.device)
    dist.broadcast(size, src=0)
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(context.device) if context.is_main
              else torch.empty(int(size.item()), dtype=torch.uint8, device=context.device))
    dist.broadcast(buffer, src=0)
    return data if context.is_main else buffer.cpu().numpy().tobytes()


def broadcast_model(qmodel, context: Context):
    """Rank 0's quantized model on every rank: rank 0 passes its model, the others ``None``. The model travels as
    an unpacked vitq checkpoint (float weights kept, so the rebuilt model computes exactly what rank 0's does)."""
    from vitq.export.checkpoint import load, save

    if not context.distributed:
        return qmodel
    with tempfile.TemporaryDirectory(prefix="vitq-broadcast-") as tmp:
        path = Path(tmp) / "model.safetensors"
        data = save(qmodel, path, packed=False).read_bytes() if context.is_main else None
        data = broadcast_bytes(data, context)
        if context.is_main:
            return qmodel
        path.write_bytes(data)
        return load(path, device=context.device)
