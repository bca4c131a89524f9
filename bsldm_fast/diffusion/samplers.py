"""Sampler updates as pure functions of (state, model output, plan entry, noise): the specification.

A denoiser maps the U-Net input U = [x_t | c] ([B, 2C, h, w]) and timesteps ([B], int64) to the
noise estimate of the C soft-tissue channels. Only those channels are clipped and updated; the
condition c goes in unchanged at every step. Each `*_update` is one step on tensors with the
coefficients of its plan entry (plan.py): the formulas that `kernels/reference.py` runs and that
the C++, CUDA and Triton kernels are tested against.

`sample` is the reference loop with an explicit noise source, for checking a plan against the
original code's own noise; the product runs `kernels.sampling.run`, which draws the noise
in-kernel from the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .plan import SAMPLERS, DDIMStep, DDPMStep, DPMStep, Plan

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[int], torch.Tensor]
Progress = Callable[[int], None]

__all__ = ["SAMPLERS", "Denoiser", "Noise", "Progress", "ddim_update", "ddpm_update", "dpmpp_update",
           "predict_x0", "sample"]


def predict_x0(x: torch.Tensor, eps: torch.Tensor, sqrt_ab: float, sqrt_1mab: float,
               clip: float) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), clipped to +-clip (BS-LDM's temporal adaptive
    thresholding, Sun et al. 2025, Sec. III-C; math.inf: no clipping)."""
    x0 = (x - sqrt_1mab * eps) / sqrt_ab
    return x0 if math.isinf(clip) else x0.clamp(-clip, clip)


def ddpm_update(x: torch.Tensor, eps: torch.Tensor, p: DDPMStep,
                noise: torch.Tensor | None) -> torch.Tensor:
    """DDPM ancestral step: diffusers' `DDPMScheduler.step` with clip_sample, operation for
    operation. `noise` is read only when the entry adds some (never on the last step)."""
    x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip)
    mean = p.x0_coeff * x0 + p.x_coeff * x
    return mean if p.noise_std == 0.0 else mean + p.noise_std * _required(noise)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, p: DDIMStep,
                noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM step. After clipping, eps is re-derived from the clipped x0 so that x0 and eps stay
    consistent (as guided-diffusion's DDIM does); this is what makes eta = 1 equal to DDPM."""
    x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip)
    if not math.isinf(p.clip):
        eps = (x - p.sqrt_ab * x0) / p.sqrt_1mab
    out = p.x0_coeff * x0 + p.eps_coeff * eps
    return out if p.noise_std == 0.0 else out + p.noise_std * _required(noise)


def dpmpp_update(x: torch.Tensor, eps: torch.Tensor, prev_x0: torch.Tensor | None,
                 p: DPMStep) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) step: (x at the next timestep, this step's clipped x0, the next step's
    prev_x0). First order when prev_x0 is None."""
    x0 = predict_x0(x, eps, p.sqrt_ab, p.sqrt_1mab, p.clip)
    if p.last:
        return x0, x0
    d = x0 if prev_x0 is None else p.w_cur * x0 - p.w_prev * prev_x0
    return p.x_coeff * x - p.d_coeff * d, x0


def _required(noise: torch.Tensor | None) -> torch.Tensor:
    if noise is None:
        raise ValueError("this step adds noise: pass the step's noise")
    return noise


def sample(plan: Plan, denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor,
           noise: Noise | None = None, progress: Progress | None = None) -> torch.Tensor:
    """Run `plan` from x_T = x, conditioned on `cond`; `noise(i)` is step i's fresh noise (only
    called by steps that add noise). Returns x_0."""
    if x.shape != cond.shape:
        raise ValueError(f"latent {tuple(x.shape)} and condition {tuple(cond.shape)} differ")
    channels = x.shape[1]
    u = torch.cat([x, cond], dim=1)
    prev_x0: torch.Tensor | None = None
    for i, (t, p) in enumerate(zip(plan.timesteps, plan.entries)):
        u[:, :channels] = x
        eps = denoiser(u, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).to(x.dtype)
        step_noise = noise(i) if noise is not None and getattr(p, "noise_std", 0.0) != 0.0 else None
        if isinstance(p, DDPMStep):
            x = ddpm_update(x, eps, p, step_noise)
        elif isinstance(p, DDIMStep):
            x = ddim_update(x, eps, p, step_noise)
        else:
            x, prev_x0 = dpmpp_update(x, eps, prev_x0, p)
        if progress is not None:
            progress(i)
    return x
