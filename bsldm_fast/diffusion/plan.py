"""Plans: (sampler, schedule, timesteps, clip rule) -> the coefficients of every step, computed once.

A plan is plain data. The reference samplers (`samplers.sample`), the fused loop
(`kernels.sampling.run`, on the CPU and inside the GPU's CUDA-graph capture) and the kernels all
read the same plan, so no coefficient is derived twice and no path can drift from another.

Every coefficient is computed in float64 from the schedule's float32 alpha_bar (schedule.py),
except DDPM's, which replay the float32 arithmetic the original sampled with
(`ddpm_coefficients_float32`).

Adding a sampler: one `*_entries` function here (and its entry type) registered in `SAMPLERS`,
its update in `samplers.py`, and its kernel (kernels/reference.py and the twins).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from .schedule import Schedule, spaced_timesteps


@dataclass(frozen=True)
class DDPMStep:
    """One DDPM step: out = x0_coeff clip(x0) + x_coeff x + noise_std (z + offset z_c)."""

    sqrt_ab: float
    sqrt_1mab: float
    clip: float
    """|x0| bound; math.inf for no clipping."""
    x0_coeff: float
    x_coeff: float
    noise_std: float
    """0 on the last step (no noise drawn)."""


@dataclass(frozen=True)
class DDIMStep:
    """One DDIM step: out = x0_coeff clip(x0) + eps_coeff eps' + noise_std (z + offset z_c)."""

    sqrt_ab: float
    sqrt_1mab: float
    clip: float
    x0_coeff: float
    eps_coeff: float
    noise_std: float


@dataclass(frozen=True)
class DPMStep:
    """One DPM-Solver++(2M) step: out = x0 if last else x_coeff x - d_coeff d, d = w_cur x0 - w_prev prev_x0."""

    sqrt_ab: float
    sqrt_1mab: float
    clip: float
    x_coeff: float
    d_coeff: float
    w_cur: float
    w_prev: float
    last: bool


StepEntry = Union[DDPMStep, DDIMStep, DPMStep]


@dataclass(frozen=True)
class Plan:
    """The steps of one sampling run: `entries[i]` is the update at `timesteps[i]`."""

    sampler: str
    timesteps: tuple[int, ...]
    entries: tuple[StepEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)


def clip_bound(clip_range: float | None) -> float:
    """A step's clip field: math.inf when clipping is off."""
    return math.inf if clip_range is None else float(clip_range)


@dataclass(frozen=True)
class DDPMCoefficients:
    """The posterior q(x_prev | x_t, x0): x_prev = x0_coeff * x0 + x_coeff * x_t + noise_std * z."""

    x0_coeff: float
    x_coeff: float
    noise_std: float


def ddpm_coefficients(alpha_bar: float, alpha_bar_prev: float) -> DDPMCoefficients:
    """Ho et al. 2020 (Eqs. 6-7), "fixed small" variance, in float64."""
    beta = 1.0 - alpha_bar / alpha_bar_prev
    return DDPMCoefficients(
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
        x0_coeff=((ab_prev**0.5 * current_beta) / beta_prod).item(),
        x_coeff=((current_alpha**0.5 * beta_prod_prev) / beta_prod).item(),
        noise_std=(variance**0.5).item(),
    )


def ddpm_entry(alpha_bar: float, alpha_bar_prev: float, clip_range: float | None, last: bool,
               coefficients: Callable[[float, float], DDPMCoefficients] = ddpm_coefficients_float32
               ) -> DDPMStep:
    """The DDPM ancestral step from alpha_bar to alpha_bar_prev; no noise on the last step."""
    c = coefficients(alpha_bar, alpha_bar_prev)
    return DDPMStep(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), clip_bound(clip_range),
                    c.x0_coeff, c.x_coeff, 0.0 if last else c.noise_std)


def ddim_entry(alpha_bar: float, alpha_bar_prev: float, clip_range: float | None, eta: float,
               last: bool) -> DDIMStep:
    """The DDIM step (Song et al. 2021, Eq. 12); eta = 0 is deterministic, eta = 1 DDPM's posterior."""
    sigma = eta * math.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev))
    return DDIMStep(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), clip_bound(clip_range),
                    math.sqrt(alpha_bar_prev), math.sqrt(max(1.0 - alpha_bar_prev - sigma**2, 0.0)),
                    0.0 if last else sigma)


def log_snr(alpha_bar: float) -> float:
    """lambda = log(alpha / sigma), DPM-Solver's time variable."""
    return 0.5 * math.log(alpha_bar / (1.0 - alpha_bar))


def dpmpp_entry(alpha_bar: float, alpha_bar_next: float, clip_range: float | None,
                h_prev: float | None) -> DPMStep:
    """The DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2); first order without a previous step
    (h_prev None); the step to alpha_bar = 1 returns x0."""
    clip = clip_bound(clip_range)
    if alpha_bar_next >= 1.0:
        return DPMStep(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), clip, 0.0, 0.0, 1.0, 0.0, True)
    h = log_snr(alpha_bar_next) - log_snr(alpha_bar)
    if h_prev is None:
        w_cur, w_prev = 1.0, 0.0
    else:
        r = h_prev / h
        w_cur, w_prev = 1.0 + 1.0 / (2.0 * r), 1.0 / (2.0 * r)
    x_coeff = math.sqrt(1.0 - alpha_bar_next) / math.sqrt(1.0 - alpha_bar)
    d_coeff = math.sqrt(alpha_bar_next) * math.expm1(-h)
    return DPMStep(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), clip, x_coeff, d_coeff, w_cur,
                   w_prev, False)


def _pairs(schedule: Schedule, timesteps: Sequence[int]) -> list[tuple[int, float, float]]:
    """(t, alpha_bar_t, alpha_bar of the next timestep; 1 after the last) for each step."""
    bars = [schedule.alpha_bar(t) for t in timesteps] + [1.0]
    return [(t, bars[i], bars[i + 1]) for i, t in enumerate(timesteps)]


def ddpm_entries(schedule: Schedule, timesteps: Sequence[int], eta: float = 0.0) -> list[StepEntry]:
    """Ancestral DDPM; with timesteps T-1..0 the original BS-LDM loop, step for step (a shorter
    descending list samples the respaced chain, betas from alpha_bar)."""
    last = len(timesteps) - 1
    return [ddpm_entry(ab, ab_prev, schedule.clip_range(t), i == last)
            for i, (t, ab, ab_prev) in enumerate(_pairs(schedule, timesteps))]


def ddim_entries(schedule: Schedule, timesteps: Sequence[int], eta: float = 0.0) -> list[StepEntry]:
    """DDIM (deterministic for eta = 0) with the clip range of each timestep."""
    last = len(timesteps) - 1
    return [ddim_entry(ab, ab_prev, schedule.clip_range(t), eta, i == last)
            for i, (t, ab, ab_prev) in enumerate(_pairs(schedule, timesteps))]


def dpmpp_entries(schedule: Schedule, timesteps: Sequence[int], eta: float = 0.0) -> list[StepEntry]:
    """DPM-Solver++(2M) in data prediction, x0 clipped to the range of each timestep."""
    entries: list[StepEntry] = []
    h_prev: float | None = None
    for t, ab, ab_next in _pairs(schedule, timesteps):
        entries.append(dpmpp_entry(ab, ab_next, schedule.clip_range(t), h_prev))
        if ab_next < 1.0:
            h_prev = log_snr(ab_next) - log_snr(ab)
    return entries


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    entries: Callable[[Schedule, Sequence[int], float], list[StepEntry]]
    default_steps: int
    """Chosen by the few-step quality study (benchmarks/quality_study.py, results/quality-demo-*)."""
    stochastic: bool
    """Whether steps add fresh noise (and so read the seeds beyond x_T)."""


_SPECS = (
    SamplerSpec("ddpm", ddpm_entries, 10, True),
    SamplerSpec("ddim", ddim_entries, 20, False),
    SamplerSpec("dpmpp", dpmpp_entries, 20, False),
)
SAMPLER_SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
SAMPLERS = tuple(SAMPLER_SPECS)
"""The sampler names, everywhere a choice is offered."""
DEFAULT_SAMPLER = "ddpm"
DEFAULT_STEPS = {spec.name: spec.default_steps for spec in _SPECS}
"""DDPM with 10 respaced steps is the fewest U-Net evaluations within 0.3 dB PSNR and 0.005 BSR of
the original 1000-step DDPM (the quality study); `steps=1000` is the original loop."""


def sampler_spec(name: str) -> SamplerSpec:
    try:
        return SAMPLER_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}") from None


def resolve_steps(sampler: str, steps: int | None) -> int:
    """`steps`, or the sampler's default when None."""
    return sampler_spec(sampler).default_steps if steps is None else int(steps)


def check_timesteps(timesteps: Sequence[int], schedule: Schedule) -> None:
    ts = list(timesteps)
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] >= schedule.num_timesteps or ts[-1] < 0:
        raise ValueError("timesteps must be strictly decreasing within [0, T)")


def plan_timesteps(sampler: str, schedule: Schedule, timesteps: Sequence[int], eta: float = 0.0) -> Plan:
    """The plan of `sampler` over explicit, strictly decreasing timesteps (eta: DDIM only)."""
    spec = sampler_spec(sampler)
    check_timesteps(timesteps, schedule)
    timesteps = tuple(int(t) for t in timesteps)
    return Plan(sampler, timesteps, tuple(spec.entries(schedule, timesteps, eta)))


def make_plan(sampler: str, schedule: Schedule, steps: int | None = None, eta: float = 0.0) -> Plan:
    """The plan of `sampler` over `steps` evenly spaced timesteps (None: the sampler's default)."""
    steps = resolve_steps(sampler, steps)
    return plan_timesteps(sampler, schedule, spaced_timesteps(schedule.num_timesteps, steps), eta)
