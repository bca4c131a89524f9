"""The sampling loop on fused kernels: U = [x | c] allocated once, every step written into it in place.

Per step the host only calls the denoiser and one kernel: coefficients are computed once per run
(in float64, as the references in diffusion/samplers.py do), timesteps are moved to the device once,
and the noise is drawn in-kernel from the Philox stream. The reference is `diffusion.samplers.sample`
with the noise of `diffusion.noise`; `tests/kernels/test_sampling.py` holds them together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..diffusion.samplers import SAMPLERS, Denoiser, _check_timesteps, ddpm_coefficients_float32
from ..diffusion.schedule import Schedule
from . import DDIMStep, DDPMStep, DPMStep, clip_bound, ddim_step, ddpm_step, dpmpp_2m_step, initial_latent


def _alpha_bars(schedule: Schedule, timesteps: Sequence[int], i: int) -> tuple[float, float]:
    nxt = schedule.alpha_bar(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0
    return schedule.alpha_bar(timesteps[i]), nxt


def ddpm_plan(schedule: Schedule, timesteps: Sequence[int]) -> list[DDPMStep]:
    """The coefficients of every step of `samplers.sample_ddpm`."""
    plan = []
    for i, t in enumerate(timesteps):
        ab, ab_prev = _alpha_bars(schedule, timesteps, i)
        c = ddpm_coefficients_float32(ab, ab_prev)
        last = i == len(timesteps) - 1
        plan.append(DDPMStep(math.sqrt(ab), math.sqrt(1.0 - ab), clip_bound(schedule.clip_range(t)),
                             c.x0_coeff, c.x_coeff, 0.0 if last else c.noise_std))
    return plan


def ddim_plan(schedule: Schedule, timesteps: Sequence[int], eta: float = 0.0) -> list[DDIMStep]:
    """The coefficients of every step of `samplers.sample_ddim`."""
    plan = []
    for i, t in enumerate(timesteps):
        ab, ab_prev = _alpha_bars(schedule, timesteps, i)
        sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        last = i == len(timesteps) - 1
        plan.append(DDIMStep(math.sqrt(ab), math.sqrt(1.0 - ab), clip_bound(schedule.clip_range(t)),
                             math.sqrt(ab_prev), math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0)),
                             0.0 if last else sigma))
    return plan


def _log_snr(alpha_bar: float) -> float:
    return 0.5 * math.log(alpha_bar / (1.0 - alpha_bar))


def dpmpp_plan(schedule: Schedule, timesteps: Sequence[int]) -> list[DPMStep]:
    """The coefficients of every step of `samplers.sample_dpmpp_2m` (2nd order from the second step)."""
    plan = []
    h_prev: float | None = None
    for i, t in enumerate(timesteps):
        ab, ab_next = _alpha_bars(schedule, timesteps, i)
        clip = clip_bound(schedule.clip_range(t))
        if ab_next >= 1.0:
            plan.append(DPMStep(math.sqrt(ab), math.sqrt(1.0 - ab), clip, 0.0, 0.0, 1.0, 0.0, True))
            continue
        h = _log_snr(ab_next) - _log_snr(ab)
        if h_prev is None:
            w_cur, w_prev = 1.0, 0.0
        else:
            r = h_prev / h
            w_cur, w_prev = 1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r)
        x_coeff = math.sqrt(1.0 - ab_next) / math.sqrt(1.0 - ab)
        d_coeff = math.sqrt(ab_next) * math.expm1(-h)
        plan.append(DPMStep(math.sqrt(ab), math.sqrt(1.0 - ab), clip, x_coeff, d_coeff, w_cur, w_prev, False))
        h_prev = h
    return plan


def sample_fused(name: str, denoiser: Denoiser, cond: torch.Tensor, seeds: torch.Tensor,
                 schedule: Schedule, timesteps: Sequence[int], offset_coefficient: float = 0.0,
                 backend: str = "auto", progress: Callable[[int], None] | None = None,
                 eta: float = 0.0, step_offset: float = 0.0) -> torch.Tensor:
    """Sample with sampler `name` ('ddpm', 'ddim', 'dpmpp') on fused kernels; returns x_0 [B, C, h, w].

    Equals `samplers.sample(name, denoiser, noise.initial_latent(seeds, ...), cond, ...)` fed
    `noise.StepNoise(seeds, ..., step_offset)` to float32 rounding. `seeds` is the int64 tensor of
    `noise.seed_tensor`; `eta` applies to DDIM; `step_offset` adds the offset term to step noise.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    _check_timesteps(timesteps, schedule)
    batch, channels = cond.shape[:2]
    seeds = seeds.to(cond.device)
    u = torch.empty((batch, 2 * channels, *cond.shape[2:]), dtype=torch.float32, device=cond.device)
    u[:, channels:] = cond  # the condition is written once
    x = u[:, :channels]
    initial_latent(seeds, offset_coefficient, x, backend)
    ts = torch.tensor(list(timesteps), dtype=torch.int64, device=cond.device).view(-1, 1).expand(-1, batch)
    if name == "ddpm":
        plan = ddpm_plan(schedule, timesteps)
    elif name == "ddim":
        plan = ddim_plan(schedule, timesteps, eta)
    else:
        plan = dpmpp_plan(schedule, timesteps)
        x0 = torch.empty_like(x)
    for i, p in enumerate(plan):
        eps = denoiser(u, ts[i])
        if name == "ddpm":
            ddpm_step(x, eps, seeds, i, p, x, step_offset, backend)
        elif name == "ddim":
            ddim_step(x, eps, seeds, i, p, x, step_offset, backend)
        else:
            dpmpp_2m_step(x, eps, x0 if i else None, p, x, x0, backend)
        if progress is not None:
            progress(i)
    return x.clone()
