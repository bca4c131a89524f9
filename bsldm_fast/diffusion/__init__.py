"""Noise schedule, plans, sampling noise and sampler updates (pure functions over tensors)."""

from .plan import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, Plan, make_plan, plan_timesteps
from .samplers import sample
from .schedule import Schedule, spaced_timesteps

__all__ = [
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "SAMPLERS",
    "Plan",
    "Schedule",
    "make_plan",
    "plan_timesteps",
    "sample",
    "spaced_timesteps",
]
