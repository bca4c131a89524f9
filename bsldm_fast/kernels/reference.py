"""Plain PyTorch references of the fused kernels: the specification the C++, CUDA and Triton twins
are tested against. Same signatures as `torch.ops.bsldm_fast.*`: flat float parameters, results
written into `out` tensors.

Philox4x32-10 is emulated exactly: uint32 values held in int64 tensors, 32x32-bit products split
into 16-bit halves so that nothing overflows int64.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
TWO_PI_F32 = 6.2831854820251465
"""float32(2 pi), the Box-Muller constant every implementation uses."""
INV_2_POW_24 = 2.0**-24
OFFSET_STREAM_DELTA = 2
"""The offset term of a draw on stream s comes from stream s + 2 (csrc/philox.h)."""


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
    """Standard normals [B, N] of the stream: sample b, element indices[n] (see diffusion/noise.py)."""
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


def philox_normal(seeds: torch.Tensor, stream: int, step: int, out: torch.Tensor) -> None:
    """out[b] = the standard normals of sample b's block, elements 0 .. out[b].numel() - 1."""
    numel = out[0].numel() if out.shape[0] else 0
    out.copy_(philox_normals(seeds, stream, step, torch.arange(numel)).view_as(out))


def initial_latent(seeds: torch.Tensor, offset: float, out: torch.Tensor) -> None:
    """x_T = z + offset * z_c (init stream, step 0)."""
    from ..diffusion.noise import INIT_STREAM

    out.copy_(noise(seeds, INIT_STREAM, 0, tuple(out.shape[1:]), offset))


def _x0(x: torch.Tensor, eps: torch.Tensor, sqrt_ab: float, sqrt_1mab: float, clip: float) -> torch.Tensor:
    x0 = (x - sqrt_1mab * eps) / sqrt_ab
    return x0 if math.isinf(clip) else x0.clamp(-clip, clip)


def _step_noise(seeds, step, shape, offset):
    from ..diffusion.noise import STEP_STREAM

    return noise(seeds, STEP_STREAM, step, shape, offset)


def ddpm_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff, noise_std, offset,
              out) -> None:
    """out = x0_coeff * clip(x0) + x_coeff * x (+ noise_std * noise): samplers.ddpm_step."""
    value = x0_coeff * _x0(x, eps, sqrt_ab, sqrt_1mab, clip) + x_coeff * x
    if noise_std != 0.0:
        value = value + noise_std * _step_noise(seeds, step, tuple(x.shape[1:]), offset).to(x.device)
    out.copy_(value)


def ddim_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff, noise_std, offset,
              out) -> None:
    """out = x0_coeff * clip(x0) + eps_coeff * eps' (+ noise_std * noise): samplers.ddim_step."""
    x0 = _x0(x, eps, sqrt_ab, sqrt_1mab, clip)
    if not math.isinf(clip):
        eps = (x - sqrt_ab * x0) / sqrt_1mab
    value = x0_coeff * x0 + eps_coeff * eps
    if noise_std != 0.0:
        value = value + noise_std * _step_noise(seeds, step, tuple(x.shape[1:]), offset).to(x.device)
    out.copy_(value)


def dpmpp_2m_step(x, eps, prev_x0, sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur, w_prev, last,
                  out, x0_out) -> None:
    """x0_out = clip(x0); out = x0 on the last step, else x_coeff * x - d_coeff * d: samplers.dpmpp_2m_step."""
    x0 = _x0(x, eps, sqrt_ab, sqrt_1mab, clip)
    if last:
        value = x0
    else:
        d = x0 if prev_x0 is None else w_cur * x0 - w_prev * prev_x0
        value = x_coeff * x - d_coeff * d
    out.copy_(value)
    x0_out.copy_(x0)


def vq_quantize(z: torch.Tensor, codes: torch.Tensor, out: torch.Tensor, indices: torch.Tensor) -> None:
    """Nearest code per latent vector, models/vqgan.py's Codebook formula and first-index ties."""
    b, d, h, w = z.shape
    flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
    codes = codes.float()
    distances = (
        (flat**2).sum(dim=1, keepdim=True)
        + (codes.t() ** 2).sum(dim=0, keepdim=True)
        - 2 * torch.mm(flat, codes.t())
    )
    best = torch.max(-distances, dim=1)[1]
    indices.copy_(best.view(b, h, w))
    out.copy_(codes[best].view(b, h, w, d).permute(0, 3, 1, 2))
