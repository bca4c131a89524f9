"""Noise schedule, sampling noise and samplers (pure functions over tensors)."""

from .samplers import SAMPLERS, sample, sample_ddim, sample_ddpm, sample_dpmpp_2m
from .schedule import Schedule, spaced_timesteps

__all__ = [
    "SAMPLERS",
    "Schedule",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "spaced_timesteps",
]
