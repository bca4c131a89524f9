"""Plain PyTorch references of the fused kernels: the specification the C++, CUDA and Triton twins
are tested against. Same signatures as `torch.ops.bsldm_fast.*`: flat float parameters, results
written into `out` tensors. Each step is the update of diffusion/samplers.py on the noise of
diffusion/noise.py, so there is one formula per sampler.
"""

from __future__ import annotations

import torch

from ..diffusion.noise import INIT_STREAM, STEP_STREAM, noise, philox_normals
from ..diffusion.plan import DDIMStep, DDPMStep, DPMStep
from ..diffusion.samplers import ddim_update, ddpm_update, dpmpp_update


def philox_normal(seeds: torch.Tensor, stream: int, step: int, out: torch.Tensor) -> None:
    """out[b] = the standard normals of sample b's block, elements 0 .. out[b].numel() - 1."""
    numel = out[0].numel() if out.shape[0] else 0
    out.copy_(philox_normals(seeds, stream, step, torch.arange(numel)).view_as(out))


def initial_latent(seeds: torch.Tensor, offset: float, out: torch.Tensor) -> None:
    """x_T = z + offset * z_c (init stream, step 0)."""
    out.copy_(noise(seeds, INIT_STREAM, 0, tuple(out.shape[1:]), offset))


def _step_noise(seeds: torch.Tensor, step: int, x: torch.Tensor, offset: float,
                noise_std: float) -> torch.Tensor | None:
    if noise_std == 0.0:
        return None
    return noise(seeds, STEP_STREAM, step, tuple(x.shape[1:]), offset).to(x.device)


def ddpm_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff, noise_std, offset,
              out) -> None:
    """out = samplers.ddpm_update with step noise (seeds, STEP_STREAM, step)."""
    p = DDPMStep(sqrt_ab, sqrt_1mab, clip, x0_coeff, x_coeff, noise_std)
    out.copy_(ddpm_update(x, eps, p, _step_noise(seeds, step, x, offset, noise_std)))


def ddim_step(x, eps, seeds, step, sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff, noise_std, offset,
              out) -> None:
    """out = samplers.ddim_update with step noise (seeds, STEP_STREAM, step)."""
    p = DDIMStep(sqrt_ab, sqrt_1mab, clip, x0_coeff, eps_coeff, noise_std)
    out.copy_(ddim_update(x, eps, p, _step_noise(seeds, step, x, offset, noise_std)))


def dpmpp_2m_step(x, eps, prev_x0, sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur, w_prev, last,
                  out, x0_out) -> None:
    """(out, x0_out) = samplers.dpmpp_update."""
    p = DPMStep(sqrt_ab, sqrt_1mab, clip, x_coeff, d_coeff, w_cur, w_prev, bool(last))
    value, x0 = dpmpp_update(x, eps, prev_x0, p)
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
