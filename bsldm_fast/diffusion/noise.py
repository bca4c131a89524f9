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

import math

import torch

INIT_STREAM = 0
"""Stream of the initial latent x_T."""
STEP_STREAM = 1
"""Stream of the per-step noise of ancestral samplers."""
OFFSET_STREAM_DELTA = 2
"""The offset term of stream s is drawn from stream s + OFFSET_STREAM_DELTA (csrc/philox.h)."""
OFFSET_STREAM = INIT_STREAM + OFFSET_STREAM_DELTA
"""Stream of the per-sample, per-channel offset term of x_T."""

_MASK64 = (1 << 64) - 1

# Philox4x32-10, emulated exactly: uint32 values held in int64 tensors, 32x32-bit products split
# into 16-bit halves so that nothing overflows int64.
MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
TWO_PI_F32 = 6.2831854820251465
"""float32(2 pi), the Box-Muller constant every implementation uses."""
INV_2_POW_24 = 2.0**-24


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a * b) >> 32 and (a * b) & 0xffffffff for uint32 a and b, without int64 overflow."""
    low16 = b & 0xFFFF
    p1 = a * (b >> 16)  # < 2^48
    p0 = a * low16  # < 2^48
    mid = p1 + (p0 >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p0 & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Salmon et al. 2011, Random123's philox4x32_R) on int64 tensors of uint32 values."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3))
    k0, k1 = torch.as_tensor(k0, dtype=torch.int64), torch.as_tensor(k1, dtype=torch.int64)
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def philox_normals(seeds: torch.Tensor, stream: int, step: int, indices: torch.Tensor) -> torch.Tensor:
    """Standard normals [B, N] of the stream: sample b, element indices[n] (the module docstring)."""
    seeds = seeds.to(torch.int64).view(-1, 1)
    index = indices.to(device=seeds.device, dtype=torch.int64).view(1, -1)
    zero = torch.zeros_like(index)
    r0, r1, r2, r3 = philox4x32_10(index >> 2, zero, zero + step, zero + stream, seeds & MASK32,
                                   (seeds >> 32) & MASK32)
    second_pair = (index & 2) != 0
    u1 = ((torch.where(second_pair, r2, r0) >> 8) + 1).to(torch.float32) * INV_2_POW_24
    u2 = (torch.where(second_pair, r3, r1) >> 8).to(torch.float32) * INV_2_POW_24
    radius = torch.sqrt(-2.0 * torch.log(u1))
    theta = TWO_PI_F32 * u2
    return torch.where((index & 1) != 0, radius * torch.sin(theta), radius * torch.cos(theta))


def noise(seeds: torch.Tensor, stream: int, step: int, shape: tuple[int, ...], offset: float) -> torch.Tensor:
    """z + offset * z_c of shape [B, *shape] ([C, h, w]): z per element, z_c per sample and channel."""
    numel = math.prod(shape)
    z = philox_normals(seeds, stream, step, torch.arange(numel)).view(-1, *shape)
    if offset:
        channels = philox_normals(seeds, stream + OFFSET_STREAM_DELTA, step, torch.arange(shape[0]))
        z = z + offset * channels.view(-1, shape[0], *([1] * (len(shape) - 1)))
    return z


def seed_tensor(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeds as the int64 tensor the kernels read: each seed taken mod 2^64 (two's complement)."""
    values = [(int(s) & _MASK64) - (1 << 64) if (int(s) & _MASK64) >> 63 else int(s) & _MASK64
              for s in seeds]
    return torch.tensor(values, dtype=torch.int64, device=device)


def normal(seeds: Sequence[int], stream: int, step: int, shape: Sequence[int],
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normals of shape [len(seeds), *shape], one independent draw per seed."""
    return noise(seed_tensor(seeds, device), stream, step, tuple(shape), 0.0)


def initial_latent(seeds: Sequence[int], shape: Sequence[int], offset_coefficient: float = 0.0,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """x_T ~ N(0, I), plus offset noise c * eps_c (one value per sample and channel) when c > 0."""
    return noise(seed_tensor(seeds, device), INIT_STREAM, 0, tuple(shape), offset_coefficient)


class StepNoise:
    """`noise(step)` -> the fresh noise of sampler step `step` for a batch with these seeds."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str,
                 offset_coefficient: float = 0.0):
        self.seeds = seed_tensor(seeds, device)
        self.shape = tuple(shape)
        self.offset = offset_coefficient

    def __call__(self, step: int) -> torch.Tensor:
        return noise(self.seeds, STEP_STREAM, step, self.shape, self.offset)
