"""Sampling noise as a pure function of (seed, stream, step, element): the same numbers on every device.

The one noise stream of bsldm_fast, shared by this PyTorch reference, the C++/CUDA kernels
(csrc/philox.h) and the Triton kernels (bsldm_fast/kernels/triton_kernels.py):

    bits   = Philox4x32-10(counter = (index >> 2, 0, step, stream), key = (seed mod 2^32, seed >> 32))
    (a, b) = (bits[0], bits[1]) if index & 2 == 0 else (bits[2], bits[3])
    u1     = ((a >> 8) + 1) * 2^-24                 in (0, 1], exact in float32
    u2     = (b >> 8) * 2^-24                       in [0, 1), exact in float32
    normal = sqrt(-2 log u1) * (sin if index & 1 else cos)(float32(2 pi) * u2)
             (Box-Muller, every operation in float32; one Philox call gives four normals)

- `seed` is the sample's seed (an unsigned 64-bit integer); each sample of a batch draws from its
  own seed, so an image gets the same noise alone or in a batch.
- `index` is the element's position in the sample's [C, h, w] block (row-major).
- `stream` separates uses: INIT_STREAM for x_T (step 0), STEP_STREAM for the noise added by step
  `step` (0-based position in the sampler's timestep list). The offset term of a draw on stream s
  (one normal per sample and channel, index = channel) comes from stream s + OFFSET_STREAM_DELTA.
- Philox4x32-10 is counter-based (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2,
  3"), so any element can be drawn alone, in any order, on any device: the kernels draw their noise
  in-kernel instead of reading a noise tensor.

The integer part is exact everywhere; log, sqrt, cos and sin are float32 on every device, so two
devices agree to float32 rounding (a few ulp), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels import reference

INIT_STREAM = 0
"""Stream of the initial latent x_T."""
STEP_STREAM = 1
"""Stream of the per-step noise of ancestral samplers."""
OFFSET_STREAM_DELTA = reference.OFFSET_STREAM_DELTA
"""The offset term of stream s is drawn from stream s + OFFSET_STREAM_DELTA."""
OFFSET_STREAM = INIT_STREAM + OFFSET_STREAM_DELTA
"""Stream of the per-sample, per-channel offset term of x_T."""

_MASK64 = (1 << 64) - 1


def seed_tensor(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeds as the int64 tensor the kernels read: each seed taken mod 2^64 (two's complement)."""
    values = [(int(s) & _MASK64) - (1 << 64) if (int(s) & _MASK64) >> 63 else int(s) & _MASK64
              for s in seeds]
    return torch.tensor(values, dtype=torch.int64, device=device)


def normal(seeds: Sequence[int], stream: int, step: int, shape: Sequence[int],
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals of shape [len(seeds), *shape], one independent draw per seed."""
    return reference.noise(seed_tensor(seeds, device), stream, step, tuple(shape), 0.0)


def initial_latent(seeds: Sequence[int], shape: Sequence[int], offset_coefficient: float = 0.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I), plus offset noise c * eps_c (one value per sample and channel) when c > 0."""
    return reference.noise(seed_tensor(seeds, device), INIT_STREAM, 0, tuple(shape), offset_coefficient)


class StepNoise:
    """`noise(step)` -> the fresh noise of sampler step `step` for a batch with these seeds."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str,
                 offset_coefficient: float = 0.0):
        self.seeds = seed_tensor(seeds, device)
        self.shape = tuple(shape)
        self.offset = offset_coefficient

    def __call__(self, step: int) -> torch.Tensor:
        return reference.noise(self.seeds, STEP_STREAM, step, self.shape, self.offset)
