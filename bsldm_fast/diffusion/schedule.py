"""Noise schedule tables, computed once; samplers only read them.

NOTE: the model was trained against diffusers' `DDPMScheduler` tables, which are float32: betas
rounded to float32, alphas = 1 - betas in float32, and alpha_bar = cumprod rounded to float32 at
each entry (torch's CPU cumprod accumulates in double). Near t = 0, 1 - alpha_bar is ~1e-5, so
exact float64 values would move the late-step coefficients by up to ~1e-3 relative. We therefore
keep exactly the model's float32 alpha_bar, stored in float64, and derive every coefficient from it
in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DiffusionConfig

MAX_BETA = 0.999


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """betas of the 'squaredcos_cap_v2' schedule (Nichol & Dhariwal 2021, Eq. 17), float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), MAX_BETA)
            for i in range(num_timesteps)
        ],
        dtype=np.float64,
    )


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """betas of the 'linear' schedule (Ho et al. 2020), float64."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def reference_tables(
    num_timesteps: int, beta_schedule: str, beta_start: float = 0.0008, beta_end: float = 0.02
) -> tuple[torch.Tensor, torch.Tensor]:
    """(betas, alpha_bar) as diffusers' float32 `DDPMScheduler` holds them, in float64 tensors.

    The plain-Python specification of `bsldm_fast._C.schedule_tables`.
    """
    if beta_schedule == "squaredcos_cap_v2":
        betas64 = cosine_betas(num_timesteps)
    elif beta_schedule == "linear":
        betas64 = linear_betas(num_timesteps, beta_start, beta_end)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
    betas32 = betas64.astype(np.float32)
    alphas32 = np.float32(1.0) - betas32
    alpha_bar32 = np.cumprod(alphas32.astype(np.float64)).astype(np.float32)
    return torch.from_numpy(betas32.astype(np.float64)), torch.from_numpy(
        alpha_bar32.astype(np.float64)
    )


def _tables(config: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from .. import _ext

    args = (config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end)
    if _ext.C is not None:
        return _ext.C.schedule_tables(*args)
    return reference_tables(*args)


@dataclass(frozen=True)
class Schedule:
    """The training noise schedule: q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""

    betas: torch.Tensor
    """float64 [T]"""
    alphas_cumprod: torch.Tensor
    """float64 [T], alpha_bar_t"""
    clip_sample: bool
    clip_range_start: float
    clip_range_rate: float

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "Schedule":
        betas, alpha_bar = _tables(config)
        return cls(
            betas=betas,
            alphas_cumprod=alpha_bar,
            clip_sample=config.clip_sample,
            clip_range_start=config.clip_range_start,
            clip_range_rate=config.clip_range_rate,
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t; t = -1 is the clean image (alpha_bar = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def clip_range(self, t: int) -> float | None:
        """Dynamic-clipping bound for the x0 predicted at timestep t, or None when clipping is off.

        The original loop rebuilds its DDPMScheduler after step j with range start + rate * j, so
        step j (0-based, t = T - 1 - j) clips with start + rate * max(j - 1, 0). Written as a
        function of t, a short schedule clips like the 1000-step one at the same t.
        """
        if not self.clip_sample:
            return None
        j = self.num_timesteps - 1 - t
        return self.clip_range_start + self.clip_range_rate * max(j - 1, 0)


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` descending timesteps from T - 1 to 0, evenly spaced; all T when steps == T."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    ts = np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64)
    return [int(t) for t in ts]
