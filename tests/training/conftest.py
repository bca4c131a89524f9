"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_pairs


@pytest.fixture
def pairs(tmp_path) -> Path:
    return make_pairs(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_vqgan_dir(tmp_path_factory) -> Path:
    """A VQGAN export (config.json + vqgan.safetensors) with random weights, for the LDM stage."""
    from bsldm_fast.modeldir import random_model
    from bsldm_fast.training.stages import save_vqgan

    model = random_model("tiny", seed=5)
    return save_vqgan(tmp_path_factory.mktemp("vqgan") / "model", model.config, model.vqgan, False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks run fastest on one thread, and a shared, loaded CI machine makes OpenMP's
    2-thread barriers stall badly (measured 60x slower); restored after each test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
