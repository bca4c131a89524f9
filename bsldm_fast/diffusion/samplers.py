"""Samplers as pure functions of (denoiser, x_T, condition, schedule, timesteps, noise).

A denoiser maps the U-Net input U = [x_t | c] ([B, 2C, h, w]) and timesteps ([B], int64) to the
noise estimate of the C soft-tissue channels. Only those channels are clipped and updated; the
condition c goes in unchanged at every step. Each `*_step` is one update on tensors with its
coefficients as Python floats computed in float64 from the schedule: the specification that the
fused kernels are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .schedule import Schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[int], torch.Tensor]
Progress = Callable[[int], None]

SAMPLERS = ("ddpm", "ddim", "dpmpp")


def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float,
               clip_range: float | None) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), clipped to +-clip_range when given."""
    x0 = (x - math.sqrt(1.0 - alpha_bar) * eps) / math.sqrt(alpha_bar)
    return x0 if clip_range is None else x0.clamp(-clip_range, clip_range)


@dataclass(frozen=True)
class DDPMCoefficients:
    """One ancestral step: x_prev = x0_coeff * x0 + x_coeff * x_t + noise_std * z."""

    alpha_bar: float
    x0_coeff: float
    x_coeff: float
    noise_std: float


def ddpm_coefficients(alpha_bar: float, alpha_bar_prev: float) -> DDPMCoefficients:
    """The posterior q(x_prev | x_t, x0) of Ho et al. 2020 (Eqs. 6-7), "fixed small" variance, float64."""
    beta = 1.0 - alpha_bar / alpha_bar_prev
    return DDPMCoefficients(
        alpha_bar=alpha_bar,
        x0_coeff=math.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar),
        x_coeff=math.sqrt(1.0 - beta) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar),
        noise_std=math.sqrt(max((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * beta, 1e-20)),
    )


def ddpm_coefficients_float32(alpha_bar: float, alpha_bar_prev: float) -> DDPMCoefficients:
    """The same coefficients in the float32 arithmetic of diffusers' `DDPMScheduler.step`.

    NOTE: the original samples with these. Near t = 0, beta_t = 1 - alpha_bar_t / alpha_bar_prev
    cancels catastrophically in float32 (~1e-3 relative), so the float64 formula would not be the
    model's sampler to float32 rounding. This replays diffusers' operations one by one on 0-dim
    float32 tensors, as diffusers does: torch divides by such a scalar as a multiplication by its
    reciprocal, which is not IEEE division, and a 1000-step chain would accumulate the difference.
    """
    ab = torch.tensor(alpha_bar, dtype=torch.float32)
    ab_prev = torch.tensor(alpha_bar_prev, dtype=torch.float32)
    beta_prod, beta_prod_prev = 1 - ab, 1 - ab_prev
    current_alpha = ab / ab_prev
    current_beta = 1 - current_alpha
    variance = torch.clamp(beta_prod_prev / beta_prod * current_beta, min=1e-20)
    return DDPMCoefficients(
        alpha_bar=alpha_bar,
        x0_coeff=((ab_prev**0.5 * current_beta) / beta_prod).item(),
        x_coeff=((current_alpha**0.5 * beta_prod_prev) / beta_prod).item(),
        noise_std=(variance**0.5).item(),
    )


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, coeffs: DDPMCoefficients,
              clip_range: float | None, noise: torch.Tensor | None) -> torch.Tensor:
    """DDPM ancestral step with BS-LDM's temporal adaptive thresholding (Sun et al. 2025, Sec. III-C).

    diffusers' `DDPMScheduler.step` with clip_sample, operation for operation; `noise` is None on
    the last step, where no noise is added.
    """
    x0 = predict_x0(x, eps, coeffs.alpha_bar, clip_range)
    mean = coeffs.x0_coeff * x0 + coeffs.x_coeff * x
    return mean if noise is None else mean + coeffs.noise_std * noise


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              clip_range: float | None, eta: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM step (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM's posterior.

    After clipping, eps is re-derived from the clipped x0 so that x0 and eps stay consistent (as
    guided-diffusion's DDIM does); this is what makes eta = 1 equal to the DDPM step.
    """
    x0 = predict_x0(x, eps, alpha_bar, clip_range)
    if clip_range is not None:
        eps = (x - math.sqrt(alpha_bar) * x0) / math.sqrt(1.0 - alpha_bar)
    sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    out = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        out = out + sigma * noise
    return out


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, prev_x0: torch.Tensor | None,
                  alpha_bar: float, alpha_bar_next: float, h_prev: float | None) -> torch.Tensor:
    """DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2) from t to the next timestep, given x0(t).

    First order (DDIM) when there is no previous x0; the step to alpha_bar = 1 returns x0.
    """
    if alpha_bar_next >= 1.0:
        return x0
    alpha_t, sigma_t = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    alpha_s, sigma_s = math.sqrt(alpha_bar_next), math.sqrt(1.0 - alpha_bar_next)
    h = _log_snr(alpha_bar_next) - _log_snr(alpha_bar)
    if prev_x0 is None or h_prev is None:
        d = x0
    else:
        r = h_prev / h
        d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * prev_x0
    return (sigma_s / sigma_t) * x - alpha_s * math.expm1(-h) * d


def _log_snr(alpha_bar: float) -> float:
    return 0.5 * math.log(alpha_bar / (1.0 - alpha_bar))


class _Evaluator:
    """Holds U = [x | c] (allocated once, c written once) and calls the denoiser on it."""

    def __init__(self, denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor):
        if x.shape != cond.shape:
            raise ValueError(f"latent {tuple(x.shape)} and condition {tuple(cond.shape)} differ")
        self.denoiser = denoiser
        self.channels = x.shape[1]
        self.u = torch.cat([x, cond], dim=1)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.u[:, : self.channels] = x
        timesteps = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        return self.denoiser(self.u, timesteps).to(x.dtype)


def _prev_alpha_bar(schedule: Schedule, timesteps: Sequence[int], i: int) -> float:
    return schedule.alpha_bar(timesteps[i + 1]) if i + 1 < len(timesteps) else 1.0


def _check_timesteps(timesteps: Sequence[int], schedule: Schedule) -> None:
    ts = list(timesteps)
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.num_timesteps or ts[-1] < 0:
        raise ValueError("timesteps must be strictly decreasing within [0, T)")


def sample_ddpm(denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                timesteps: Sequence[int], noise: Noise, progress: Progress | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling; with timesteps T-1..0 it is the original BS-LDM loop, step for step.

    A shorter, descending list of timesteps samples the respaced chain (betas from alpha_bar).
    """
    _check_timesteps(timesteps, schedule)
    evaluate = _Evaluator(denoiser, x, cond)
    for i, t in enumerate(timesteps):
        eps = evaluate(x, t)
        last = i == len(timesteps) - 1
        coeffs = ddpm_coefficients_float32(schedule.alpha_bar(t), _prev_alpha_bar(schedule, timesteps, i))
        x = ddpm_step(x, eps, coeffs, schedule.clip_range(t), None if last else noise(i))
        if progress is not None:
            progress(i)
    return x


def sample_ddim(denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                timesteps: Sequence[int], eta: float = 0.0, noise: Noise | None = None,
                progress: Progress | None = None) -> torch.Tensor:
    """DDIM sampling (deterministic for eta = 0) with the clip range of each timestep."""
    _check_timesteps(timesteps, schedule)
    evaluate = _Evaluator(denoiser, x, cond)
    for i, t in enumerate(timesteps):
        eps = evaluate(x, t)
        last = i == len(timesteps) - 1
        step_noise = noise(i) if (eta > 0.0 and not last and noise is not None) else None
        x = ddim_step(x, eps, schedule.alpha_bar(t), _prev_alpha_bar(schedule, timesteps, i),
                      schedule.clip_range(t), eta, step_noise)
        if progress is not None:
            progress(i)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
                    timesteps: Sequence[int], progress: Progress | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) in data prediction, x0 clipped to the range of each timestep."""
    _check_timesteps(timesteps, schedule)
    evaluate = _Evaluator(denoiser, x, cond)
    prev_x0: torch.Tensor | None = None
    h_prev: float | None = None
    for i, t in enumerate(timesteps):
        alpha_bar = schedule.alpha_bar(t)
        alpha_bar_next = _prev_alpha_bar(schedule, timesteps, i)
        x0 = predict_x0(x, evaluate(x, t), alpha_bar, schedule.clip_range(t))
        x = dpmpp_2m_step(x, x0, prev_x0, alpha_bar, alpha_bar_next, h_prev)
        if alpha_bar_next < 1.0:
            h_prev = _log_snr(alpha_bar_next) - _log_snr(alpha_bar)
        prev_x0 = x0
        if progress is not None:
            progress(i)
    return x


def sample(name: str, denoiser: Denoiser, x: torch.Tensor, cond: torch.Tensor, schedule: Schedule,
           timesteps: Sequence[int], noise: Noise, progress: Progress | None = None) -> torch.Tensor:
    """Dispatch by sampler name: 'ddpm', 'ddim' (eta = 0) or 'dpmpp' (DPM-Solver++(2M))."""
    if name == "ddpm":
        return sample_ddpm(denoiser, x, cond, schedule, timesteps, noise, progress)
    if name == "ddim":
        return sample_ddim(denoiser, x, cond, schedule, timesteps, 0.0, None, progress)
    if name == "dpmpp":
        return sample_dpmpp_2m(denoiser, x, cond, schedule, timesteps, progress)
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
