import math

import numpy as np
import pytest
import torch

from bsldm_fast.config import PAPER, DiffusionConfig
from bsldm_fast.diffusion.schedule import Schedule, reference_tables, spaced_timesteps


def test_cosine_alpha_bar_follows_its_definition():
    """alpha_bar_t = f(t+1)/f(0) for f(t) = cos((t/T + s)/(1 + s) * pi/2)^2 (Nichol & Dhariwal, Eq. 17),
    up to float32 rounding and the beta cap at 0.999 (only the last step hits it)."""
    betas, alpha_bar = reference_tables(1000, "squaredcos_cap_v2")
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    exact = np.array([f(t + 1) / f(0) for t in range(1000)])
    rel = np.abs(alpha_bar.numpy()[:-1] - exact[:-1]) / exact[:-1]
    assert rel.max() < 1e-5
    assert betas.max().item() == float(np.float32(0.999)) and betas.min().item() > 0
    assert torch.all(alpha_bar[1:] < alpha_bar[:-1])


def test_tables_are_float32_values_in_float64():
    betas, alpha_bar = reference_tables(1000, "squaredcos_cap_v2")
    assert betas.dtype == alpha_bar.dtype == torch.float64
    assert torch.equal(alpha_bar, alpha_bar.float().double())
    # alpha_bar_0 = 1 - beta_0, computed in float32 as the model's trainer did.
    assert alpha_bar[0].item() == float(np.float32(1) - np.float32(betas[0].item()))


def test_linear_schedule():
    betas, _ = reference_tables(10, "linear", 0.001, 0.02)
    assert betas[0].item() == pytest.approx(0.001, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-6)


def test_clip_range_rule_of_the_original_loop():
    """Step j (0-based, t = 999 - j) clips with 1.4 + 0.003 * max(j - 1, 0)."""
    schedule = Schedule.from_config(PAPER.diffusion)
    for j in [0, 1, 2, 3, 500, 998, 999]:
        assert schedule.clip_range(999 - j) == pytest.approx(1.4 + 0.003 * max(j - 1, 0), abs=1e-12)
    assert schedule.clip_range(999) == schedule.clip_range(998) == 1.4
    off = Schedule.from_config(DiffusionConfig(clip_sample=False))
    assert off.clip_range(500) is None


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 50, 1000])
def test_spaced_timesteps(steps):
    ts = spaced_timesteps(1000, steps)
    assert len(ts) == steps and ts[0] == 999
    assert all(b < a for a, b in zip(ts, ts[1:]))
    if steps > 1:
        assert ts[-1] == 0
    if steps == 1000:
        assert ts == list(range(999, -1, -1))


def test_spaced_timesteps_range():
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 0)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 1001)
