"""Each rank of a torchrun job on its own device; a plain run untouched (bsldm_fast/distributed.py)."""

import pytest
import torch

from bsldm_fast import distributed
from bsldm_fast.io.ranks import SOLO


def _torchrun(monkeypatch, local_rank, world=4):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))


def test_a_plain_run_is_solo_and_keeps_its_device(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.join() is SOLO
    assert [distributed.rank_device(d) for d in ("auto", "cuda", "cpu")] == ["auto", "cuda", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: a plain run too
    assert distributed.join() is SOLO


@pytest.mark.parametrize("gpus,local_rank,expected", [(4, 3, "cuda:3"), (2, 3, "cuda:1")])
def test_rank_r_takes_gpu_local_rank(monkeypatch, gpus, local_rank, expected):
    _torchrun(monkeypatch, local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert distributed.rank_device("auto") == expected
    assert distributed.rank_device("cuda") == expected
    assert distributed.rank_device("cuda:0") == "cuda:0"  # asked for: kept
    assert distributed.rank_device("cpu") == "cpu"


def test_cpu_ranks_without_a_gpu(monkeypatch):
    _torchrun(monkeypatch, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.rank_device("auto") == "cpu"
    assert distributed.rank_device("cuda") == "cuda"  # the Suppressor says there is no GPU
