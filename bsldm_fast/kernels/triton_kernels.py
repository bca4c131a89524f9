"""Triton versions of the fused sampler kernels, for CUDA devices (and the CPU under TRITON_INTERPRET=1).

Same signatures as `torch.ops.bsldm_fast.*` and `reference.py`; the same float32 operations in the
same order as csrc/sampler_kernels.h, and the noise stream of diffusion/noise.py drawn in-kernel.
Divisions and square roots are the IEEE ones (`div_rn`, `sqrt_rn`): Triton's plain `/` and
`sqrt` are approximate on NVIDIA GPUs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..diffusion.noise import INIT_STREAM, OFFSET_STREAM_DELTA, STEP_STREAM

BLOCK = 1024
VQ_BLOCK = 64
VQ_CODES = 32


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (csrc/philox.h): uint32 blocks c0..c3, uint32 scalar key."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _key(seeds_ptr, b):
    seed = tl.load(seeds_ptr + b)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _normal(index, k0, k1, stream, step):
    """Standard normals of the stream at uint32 element indices `index` (diffusion/noise.py)."""
    zero = index * 0
    r0, r1, r2, r3 = _philox(index >> 2, zero, (zero + step).to(tl.uint32),
                             (zero + stream).to(tl.uint32), k0, k1)
    second_pair = (index & 2) != 0
    u1 = ((tl.where(second_pair, r2, r0) >> 8) + 1).to(tl.float32) * 5.9604644775390625e-08
    u2 = (tl.where(second_pair, r3, r1) >> 8).to(tl.float32) * 5.9604644775390625e-08
    radius = tl.sqrt_rn(-2.0 * tl.log(u1))
    theta = 6.2831854820251465 * u2
    return tl.where((index & 1) != 0, radius * tl.sin(theta), radius * tl.cos(theta))


@triton.jit
def _noise(idx, plane, k0, k1, STREAM: tl.constexpr, step, offset, OFFSET: tl.constexpr,
           OFFSET_DELTA: tl.constexpr):
    z = _normal(idx.to(tl.uint32), k0, k1, STREAM, step)
    if OFFSET:
        channel = (idx // plane).to(tl.uint32)
        z = z + offset * _normal(channel, k0, k1, STREAM + OFFSET_DELTA, step)
    return z


@triton.jit
def _x0(x, eps, sqrt_ab, sqrt_1mab, clip):
    x0 = tl.div_rn(x - sqrt_1mab * eps, sqrt_ab)
    x0 = tl.where(x0 < -clip, -clip, x0)
    return tl.where(x0 > clip, clip, x0)


# The step index changes every call: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["step"])
def _normal_kernel(out_ptr, seeds_ptr, out_stride, inner, stream, step, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    k0, k1 = _key(seeds_ptr, b)
    z = _normal(idx.to(tl.uint32), k0, k1, stream, step)
    tl.store(out_ptr + b * out_stride + idx, z, mask=mask)


@triton.jit
def _initial_latent_kernel(out_ptr, seeds_ptr, out_stride, inner, plane, offset,
                           OFFSET: tl.constexpr, STREAM: tl.constexpr, OFFSET_DELTA: tl.constexpr,
                           BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    k0, k1 = _key(seeds_ptr, b)
    z = _noise(idx, plane, k0, k1, STREAM, 0, offset, OFFSET, OFFSET_DELTA)
    tl.store(out_ptr + b * out_stride + idx, z, mask=mask)


# DDPM (out = x0_coeff x0 + coeff x) and DDIM (out = x0_coeff x0 + coeff eps, eps re-derived from
# the clipped x0 when REDERIVE), each its own specialisation through the DDIM constexpr. The step
# index changes every call: one compiled kernel for all of them.
@triton.jit(do_not_specialize=["step"])
def _noisy_step_kernel(x_ptr, eps_ptr, out_ptr, seeds_ptr, x_stride, eps_stride, out_stride, inner,
                       plane, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, coeff, noise_std, offset,
                       DDIM: tl.constexpr, REDERIVE: tl.constexpr, NOISE: tl.constexpr,
                       OFFSET: tl.constexpr, STREAM: tl.constexpr, OFFSET_DELTA: tl.constexpr,
                       BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    x = tl.load(x_ptr + b * x_stride + idx, mask=mask)
    eps = tl.load(eps_ptr + b * eps_stride + idx, mask=mask)
    x0 = _x0(x, eps, sqrt_ab, sqrt_1mab, clip)
    if DDIM:
        if REDERIVE:
            eps = tl.div_rn(x - sqrt_ab * x0, sqrt_1mab)
        value = x0_coeff * x0 + coeff * eps
    else:
        value = x0_coeff * x0 + coeff * x
    if NOISE:
        k0, k1 = _key(seeds_ptr, b)
        z = _noise(idx, plane, k0, k1, STREAM, step, offset, OFFSET, OFFSET_DELTA)
        value = value + noise_std * z
    tl.store(out_ptr + b * out_stride + idx, value, mask=mask)


@triton.jit
def _dpmpp_2m_kernel(x_ptr, eps_ptr, prev_ptr, out_ptr, x0_ptr, x_stride, eps_stride, prev_stride,
                     out_stride, x0_stride, inner, sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff,
                     w_cur, w_prev, HAS_PREV: tl.constexpr, LAST: tl.constexpr,
                     BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < inner
    x = tl.load(x_ptr + b * x_stride + idx, mask=mask)
    eps = tl.load(eps_ptr + b * eps_stride + idx, mask=mask)
    x0 = _x0(x, eps, sqrt_ab, sqrt_1mab, clip)
    if LAST:
        value = x0
    else:
        if HAS_PREV:
            prev = tl.load(prev_ptr + b * prev_stride + idx, mask=mask)
            d = w_cur * x0 - w_prev * prev
        else:
            d = x0
        value = x_coeff * x - d_coeff * d
    tl.store(out_ptr + b * out_stride + idx, value, mask=mask)
    tl.store(x0_ptr + b * x0_stride + idx, x0, mask=mask)


@triton.jit
def _vq_kernel(z_ptr, codes_ptr, out_ptr, idx_ptr, z_stride, out_stride, plane,
               NUM_CODES: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CODES: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    pos = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = pos < plane
    z_base = z_ptr + b * z_stride + pos
    norm = tl.zeros([BLOCK], dtype=tl.float32)
    for d in tl.static_range(D):
        v = tl.load(z_base + d * plane, mask=mask, other=0.0)
        norm = norm + v * v
    best = tl.zeros([BLOCK], dtype=tl.int32)
    best_distance = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for start in range(0, NUM_CODES, CODES):
        k = start + tl.arange(0, CODES)
        k_mask = k < NUM_CODES
        dot = tl.zeros([BLOCK, CODES], dtype=tl.float32)
        code_norm = tl.zeros([CODES], dtype=tl.float32)
        for d in tl.static_range(D):
            v = tl.load(z_base + d * plane, mask=mask, other=0.0)
            c = tl.load(codes_ptr + k * D + d, mask=k_mask, other=0.0)
            dot = dot + v[:, None] * c[None, :]
            code_norm = code_norm + c * c
        distance = (norm[:, None] + code_norm[None, :]) - 2.0 * dot
        distance = tl.where(k_mask[None, :], distance, float("inf"))
        chunk_best = tl.argmin(distance, axis=1, tie_break_left=True)
        chunk_distance = tl.min(distance, axis=1)
        better = chunk_distance < best_distance  # strict: ties keep the lowest index
        best = tl.where(better, chunk_best + start, best)
        best_distance = tl.where(better, chunk_distance, best_distance)
    out_base = out_ptr + b * out_stride + pos
    for d in tl.static_range(D):
        tl.store(out_base + d * plane, tl.load(codes_ptr + best * D + d, mask=mask), mask=mask)
    tl.store(idx_ptr + b * plane + pos, best.to(tl.int64), mask=mask)


def _grid(out: torch.Tensor, block: int = BLOCK) -> tuple[int, int]:
    inner = out[0].numel() if out.shape[0] else 0
    return (triton.cdiv(inner, block), out.shape[0])


def _plane(t: torch.Tensor) -> int:
    return t.shape[-1] * t.shape[-2] if t.dim() >= 4 else 1


def philox_normal(seeds, stream, step, out) -> None:
    """out[b] = standard normals of sample b, elements 0 .. out[b].numel() - 1."""
    if out.numel():
        _normal_kernel[_grid(out)](out, seeds, out.stride(0), out[0].numel(), stream, step, BLOCK=BLOCK)


def initial_latent(seeds, offset, out) -> None:
    if out.numel():
        _initial_latent_kernel[_grid(out)](out, seeds, out.stride(0), out[0].numel(), _plane(out),
                                           offset, OFFSET=offset != 0.0, STREAM=INIT_STREAM,
                                           OFFSET_DELTA=OFFSET_STREAM_DELTA, BLOCK=BLOCK)


def _noisy_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, coeff, noise_std, offset, out,
                ddim: bool) -> None:
    if out.numel():
        _noisy_step_kernel[_grid(out)](
            x, eps, out, seeds, x.stride(0), eps.stride(0), out.stride(0), out[0].numel(),
            _plane(out), step, sqrt_ab, sqrt_1mab, clip, x0_coeff, coeff, noise_std, offset,
            DDIM=ddim, REDERIVE=ddim and not math.isinf(clip), NOISE=noise_std != 0.0,
            OFFSET=offset != 0.0, STREAM=STEP_STREAM, OFFSET_DELTA=OFFSET_STREAM_DELTA, BLOCK=BLOCK)


def ddpm_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff, noise_std, offset,
              out) -> None:
    _noisy_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff, noise_std, offset, out,
                ddim=False)


def ddim_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff, noise_std, offset,
              out) -> None:
    _noisy_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff, noise_std, offset, out,
                ddim=True)


def dpmpp_2m_step(x, eps, prev_x0, sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur, w_prev, last,
                  out, x0_out) -> None:
    if out.numel():
        prev = x0_out if prev_x0 is None else prev_x0
        _dpmpp_2m_kernel[_grid(out)](
            x, eps, prev, out, x0_out, x.stride(0), eps.stride(0), prev.stride(0), out.stride(0),
            x0_out.stride(0), out[0].numel(), sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur,
            w_prev, HAS_PREV=prev_x0 is not None, LAST=bool(last), BLOCK=BLOCK)


def vq_quantize(z, codes, out, indices) -> None:
    if z.numel():
        plane = z.shape[2] * z.shape[3]
        _vq_kernel[(triton.cdiv(plane, VQ_BLOCK), z.shape[0])](
            z, codes, out, indices, z.stride(0), out.stride(0), plane, NUM_CODES=codes.shape[0],
            D=codes.shape[1], BLOCK=VQ_BLOCK, CODES=VQ_CODES)
