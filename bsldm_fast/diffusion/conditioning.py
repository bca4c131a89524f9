"""How the CXR latent conditions the U-Net, one rule for training, sampling and the exported graphs.

With `condition_scaling="original"` the CXR latent c is scaled by sqrt(alpha_bar_t), as the
original training noised it; with "none" it goes in as is.
"""

from __future__ import annotations

import torch

from ..config import DiffusionConfig
from .schedule import Schedule


def condition_scale(config: DiffusionConfig) -> torch.Tensor | None:
    """The per-timestep scale of c ([T] float32: sqrt(alpha_bar_t) taken in float64, rounded once),
    or None when the condition is not scaled."""
    if config.condition_scaling != "original":
        return None
    return Schedule.from_config(config).alphas_cumprod.sqrt().float()


def scale_condition(cond: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """c [B, C, h, w] as the U-Net sees it at timesteps t [B]."""
    return cond if scale is None else cond * scale[t].view(-1, 1, 1, 1)
