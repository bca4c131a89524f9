"""Sampling noise as a pure function of (seed, stream, step): the same numbers on every device.

Each sample of a batch draws from its own seed, so an image gets the same result alone or in a
batch. Numbers are drawn on the CPU and then moved, which makes them device-independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INIT_STREAM = 0
"""Stream of the initial latent x_T."""
STEP_STREAM = 1
"""Stream of the per-step noise of ancestral samplers."""
OFFSET_STREAM = 2
"""Stream of the per-sample, per-channel offset term."""

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    key = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ stream) ^ step)
    return torch.Generator().manual_seed(key & ((1 << 63) - 1))


def normal(seeds: Sequence[int], stream: int, step: int, shape: Sequence[int],
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals of shape [len(seeds), *shape], one independent draw per seed."""
    draws = [torch.randn(tuple(shape), generator=_generator(s, stream, step)) for s in seeds]
    return torch.stack(draws).to(device)


def initial_latent(seeds: Sequence[int], shape: Sequence[int], offset_coefficient: float = 0.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I), plus offset noise c * eps_c (one value per sample and channel) when c > 0."""
    x = normal(seeds, INIT_STREAM, 0, shape, device)
    if offset_coefficient:
        x = x + offset_coefficient * normal(seeds, OFFSET_STREAM, 0, (shape[0], 1, 1), device)
    return x


class StepNoise:
    """`noise(step)` -> the fresh noise of sampler step `step` for a batch with these seeds."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str):
        self.seeds = list(seeds)
        self.shape = tuple(shape)
        self.device = device

    def __call__(self, step: int) -> torch.Tensor:
        return normal(self.seeds, STEP_STREAM, step, self.shape, self.device)
