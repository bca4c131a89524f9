"""torchrun for inference: the ranks of a `bsldm-fast suppress` job and the device of each.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with a
world of 1) a run is a plain single process and nothing distributed is initialised.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .io.ranks import SOLO, Group

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(hours=24)
"""How long a rank may wait for the others. The ranks meet only to start, after loading the model
and at the end, where one that finished its share early waits for the slowest; a dead rank is found
sooner than this (its connections close, and torchrun stops the job when a rank exits)."""


class TorchGroup:
    """The ranks of a torchrun job, over a gloo process group.

    NOTE: gloo even when the ranks run on GPUs: the ranks exchange only small Python objects (the
    plan, each rank's share, a status), never tensors, so NCCL would add nothing but GPU memory."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def all_gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        box: list[Any] = [None]
        dist.scatter_object_list(box, list(objs) if self.rank == 0 else None, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> Group:
    """This process's group: the torchrun job it is a rank of (gloo process group), else `SOLO`."""
    if not under_torchrun():
        return SOLO
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    logger.info("rank %d of %d", rank, world)
    return TorchGroup(rank, world)


def leave(group: Group) -> None:
    if isinstance(group, TorchGroup) and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str) -> str:
    """The device of this rank: with 'auto' or 'cuda', GPU LOCAL_RANK of this machine (modulo the
    GPUs it has); an explicit 'cuda:N' or 'cpu' is kept."""
    if not under_torchrun() or device not in ("auto", "cuda"):
        return device
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if not torch.cuda.is_available():
        return device  # resolve_device names the problem
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        logger.warning("LOCAL_RANK %d on a machine with %d GPU(s): ranks share GPU %d", local,
                       count, local % count)
    return f"cuda:{local % count}"
