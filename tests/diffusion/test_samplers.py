"""Samplers against hand-written float64 formulas and problems with known answers."""

import math

import numpy as np
import pytest
import torch

from bsldm_fast.config import PAPER, DiffusionConfig
from bsldm_fast.diffusion.noise import StepNoise
from bsldm_fast.diffusion.plan import (
    ddim_entry,
    ddpm_coefficients,
    ddpm_coefficients_float32,
    ddpm_entry,
    plan_timesteps,
)
from bsldm_fast.diffusion.samplers import ddim_update, ddpm_update, sample
from bsldm_fast.diffusion.schedule import Schedule, spaced_timesteps

SCHEDULE = Schedule.from_config(PAPER.diffusion)
UNCLIPPED = Schedule.from_config(DiffusionConfig(clip_sample=False))


def ddpm_step(x, eps, t, clip, z, coefficients=ddpm_coefficients):
    """One DDPM update from timestep t, through its plan entry."""
    p = ddpm_entry(SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t - 1), clip, z is None, coefficients)
    return ddpm_update(x, eps, p, z)


def sample_ddpm(denoiser, x, cond, schedule, ts, noise):
    return sample(plan_timesteps("ddpm", schedule, ts), denoiser, x, cond, noise)


def sample_ddim(denoiser, x, cond, schedule, ts, eta=0.0, noise=None):
    return sample(plan_timesteps("ddim", schedule, ts, eta), denoiser, x, cond, noise)


def sample_dpmpp_2m(denoiser, x, cond, schedule, ts):
    return sample(plan_timesteps("dpmpp", schedule, ts), denoiser, x, cond)


def _ddpm_step_by_hand(x, eps, t, clip, z):
    """Ho et al. 2020, Eqs. 6-7, in float64 NumPy, from alpha_bar alone."""
    ab = SCHEDULE.alphas_cumprod.numpy()
    a_t, a_prev = ab[t], (ab[t - 1] if t > 0 else 1.0)
    beta = 1 - a_t / a_prev
    x0 = np.clip((x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t), -clip, clip)
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    var = (1 - a_prev) / (1 - a_t) * beta
    return mean + (np.sqrt(var) * z if t > 0 else 0)


@pytest.mark.parametrize("j", [0, 1, 2, 100, 500, 900, 990, 999])
def test_ddpm_step_against_float64_formula(j, gen):
    t = 999 - j
    x = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64) * 1.5
    eps = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    clip = 1.4 + 0.003 * max(j - 1, 0)
    assert SCHEDULE.clip_range(t) == pytest.approx(clip, abs=1e-12)
    expected = _ddpm_step_by_hand(x.numpy(), eps.numpy(), t, clip, z.numpy())
    exact = ddpm_step(x, eps, t, clip, z if t > 0 else None)
    np.testing.assert_allclose(exact.numpy(), expected, rtol=1e-10, atol=1e-12)
    # The original's float32 coefficients: the same step up to float32 cancellation in
    # beta_t = 1 - alpha_bar_t / alpha_bar_prev, bounded by a few ulp(1) / (1 - alpha_bar_t).
    faithful = ddpm_step(x, eps, t, clip, z if t > 0 else None, ddpm_coefficients_float32)
    bound = 4 * np.finfo(np.float32).eps / (1 - SCHEDULE.alpha_bar(t)) * np.abs(expected).max() + 1e-6
    assert np.abs(faithful.numpy() - expected).max() <= bound


def test_ddpm_clips_only_when_needed(gen):
    t = 999
    x = torch.full((1, 4, 2, 2), 50.0, dtype=torch.float64)
    eps = torch.zeros_like(x)
    c = ddpm_coefficients(SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t - 1))
    clipped = ddpm_step(x, eps, t, 1.4, None)
    unclipped = ddpm_step(x, eps, t, None, None)
    assert torch.allclose(clipped, c.x0_coeff * 1.4 + c.x_coeff * x)
    assert (unclipped > clipped).all()


@pytest.mark.parametrize("t", [999, 600, 50, 1])
def test_ddim_eta_one_is_the_ddpm_posterior(t, gen):
    x = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64)
    a, a_prev = SCHEDULE.alpha_bar(t), SCHEDULE.alpha_bar(t - 1)
    for clip in (None, 1.0):
        ddpm = ddpm_step(x, eps, t, clip, z)
        ddim = ddim_update(x, eps, ddim_entry(a, a_prev, clip, 1.0, False), z)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_ddim_eta_one_sampler_equals_ddpm_sampler(gen):
    """Whole trajectories with the same noise, on a respaced 25-step chain, clipping on."""
    cond = torch.randn(2, 4, 3, 3, generator=gen)
    x_t = torch.randn(2, 4, 3, 3, generator=gen)
    weight = torch.randn(4, 8, generator=gen) * 0.3

    def denoiser(u, t):
        return torch.tanh(torch.einsum("oc,bchw->bohw", weight.to(u.dtype), u)) + t.view(-1, 1, 1, 1) / 2000

    ts = spaced_timesteps(1000, 25)
    noise = StepNoise([1, 2], (4, 3, 3), "cpu")
    # DDPM samples with the original's float32 coefficients; compare in the same arithmetic.
    ddpm = sample_ddpm(denoiser, x_t.double(), cond.double(), SCHEDULE, ts,
                       lambda i: noise(i).double())
    ddim = sample_ddim(denoiser, x_t.double(), cond.double(), SCHEDULE, ts, eta=1.0,
                       noise=lambda i: noise(i).double())
    torch.testing.assert_close(ddim, ddpm, rtol=1e-5, atol=1e-5)


class GaussianData:
    """x0 ~ N(mu, s^2) per element: the exact denoiser and the exact ODE solution are known."""

    def __init__(self, mu, s, schedule):
        self.mu, self.s, self.schedule = mu, s, schedule

    def denoiser(self, u, t):
        a = self.schedule.alphas_cumprod[t].view(-1, 1, 1, 1).to(u.dtype)
        x = u[:, :4]
        alpha, sigma2 = a.sqrt(), 1 - a
        x0 = self.mu + alpha * self.s**2 / (a * self.s**2 + sigma2) * (x - alpha * self.mu)
        return (x - alpha * x0) / sigma2.sqrt()

    def ode_solution(self, x_t, t):
        """The probability-flow ODE keeps (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) constant."""
        a = self.schedule.alpha_bar(t)
        return self.mu + self.s * (x_t - math.sqrt(a) * self.mu) / math.sqrt(a * self.s**2 + 1 - a)


def test_dpmpp_converges_on_gaussian_data(gen):
    data = GaussianData(mu=0.3, s=0.5, schedule=UNCLIPPED)
    x_t = torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64)
    cond = torch.zeros_like(x_t)
    truth = data.ode_solution(x_t, 999)
    errors = []
    for steps in (10, 20, 40, 80):
        ts = spaced_timesteps(1000, steps)
        out = sample_dpmpp_2m(data.denoiser, x_t, cond, UNCLIPPED, ts)
        errors.append((out - truth).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 2e-2, errors
    # Second order: doubling the steps cuts the error ~4x, where first-order DDIM manages ~2x.
    assert errors[-2] / errors[-1] > 3.5, errors
    ddim = sample_ddim(data.denoiser, x_t, cond, UNCLIPPED, spaced_timesteps(1000, 80))
    assert (ddim - truth).abs().max().item() > 2 * errors[-1]


def test_ddim_converges_on_gaussian_data(gen):
    data = GaussianData(mu=-0.2, s=0.8, schedule=UNCLIPPED)
    x_t = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    truth = data.ode_solution(x_t, 999)
    errors = [
        (sample_ddim(data.denoiser, x_t, torch.zeros_like(x_t), UNCLIPPED, spaced_timesteps(1000, n))
         - truth).abs().max().item()
        for n in (10, 50, 250)
    ]
    # First order: 5x the steps, ~5x less error.
    assert errors[0] > errors[1] > errors[2] and 3 < errors[1] / errors[2] < 7, errors


def test_condition_channels_reach_the_denoiser_unchanged(gen):
    cond = torch.randn(1, 4, 3, 3, generator=gen)
    seen = []

    def denoiser(u, t):
        seen.append(u[:, 4:].clone())
        return torch.zeros_like(u[:, :4])

    x_t = torch.randn(1, 4, 3, 3, generator=gen)
    sample_ddpm(denoiser, x_t, cond, SCHEDULE, spaced_timesteps(1000, 6), StepNoise([0], (4, 3, 3), "cpu"))
    assert len(seen) == 6 and all(torch.equal(s, cond) for s in seen)


def test_full_ddpm_applies_the_widening_clip_each_step():
    """A denoiser whose x0 estimate is huge: after every step the x0 used is exactly the clip bound."""
    seen_bounds = []

    def denoiser(u, t):
        return torch.full_like(u[:, :4], -1e4)  # x0 = (x + sqrt(1-a) 1e4) / sqrt(a): far above any bound

    import bsldm_fast.diffusion.samplers as samplers

    original = samplers.predict_x0

    def spy(x, eps, sqrt_ab, sqrt_1mab, clip):
        seen_bounds.append(clip)
        return original(x, eps, sqrt_ab, sqrt_1mab, clip)

    samplers.predict_x0 = spy
    try:
        x_t = torch.zeros(1, 4, 2, 2)
        sample_ddpm(denoiser, x_t, torch.zeros_like(x_t), SCHEDULE, list(range(999, -1, -1)),
                    StepNoise([0], (4, 2, 2), "cpu"))
    finally:
        samplers.predict_x0 = original
    assert len(seen_bounds) == 1000
    expected = [1.4 + 0.003 * max(j - 1, 0) for j in range(1000)]
    np.testing.assert_allclose(seen_bounds, expected, rtol=0, atol=1e-12)


def test_timesteps_must_decrease():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="decreasing"):
        sample_ddim(lambda u, t: u[:, :4], x, x, SCHEDULE, [10, 20])
