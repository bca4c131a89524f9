"""Shared fixtures. Every test draws fresh random inputs from a per-test seeded generator."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's name: fresh inputs per test, reproducible on rerun."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def tiny_model():
    from bsldm_fast.modeldir import random_model

    return random_model("tiny", seed=3)
