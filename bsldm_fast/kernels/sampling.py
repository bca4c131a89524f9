"""The sampling loop: one `run(plan, denoise, buffers, offset, backend)` for the CPU and the GPU.

U = [x | c] is allocated once (`Buffers`), the condition written into it once, and every step
writes x back into U in place. Per step the host only calls the denoiser and one kernel: the
coefficients come from the plan (diffusion/plan.py, computed once per run), the timesteps were
moved to the device when the buffers were made, and the noise is drawn in-kernel from the Philox
stream. So the loop can be captured in a CUDA graph as is (pipeline.py does), and on the CPU it
runs the same way with no capture.

With `backend="reference"` the kernels are diffusion/samplers.py's updates, so this loop on the
reference equals `samplers.sample` fed the Philox noise, bit for bit (tests/kernels/test_sampling.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..diffusion.plan import DDIMStep, DDPMStep, DPMStep, Plan
from . import ddim_step, ddpm_step, dpmpp_2m_step, initial_latent

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Buffers:
    """The device tensors of one sampling run of a batch, allocated once and reused."""

    u: torch.Tensor
    """[B, 2C, h, w] float32: x_t in channels :C, the condition c in C:."""
    seeds: torch.Tensor
    """[B] int64, one noise seed per sample."""
    timesteps: torch.Tensor
    """[steps, B] int64, one contiguous row per step (TensorRT wants contiguous inputs)."""
    x0: torch.Tensor | None
    """[B, C, h, w]: the previous x0 of multistep samplers (DPM-Solver++), else None."""

    @classmethod
    def allocate(cls, plan: Plan, batch: int, latent_shape: tuple[int, int, int],
                 device: torch.device | str) -> "Buffers":
        """Zeroed buffers for `batch` latents of shape [C, h, w] sampled by `plan`."""
        c, h, w = latent_shape
        timesteps = torch.tensor(plan.timesteps, dtype=torch.int64, device=device).view(-1, 1).repeat(1, batch)
        x0 = (torch.zeros((batch, c, h, w), device=device)
              if any(isinstance(p, DPMStep) for p in plan.entries) else None)
        return cls(torch.zeros((batch, 2 * c, h, w), device=device),
                   torch.zeros(batch, dtype=torch.int64, device=device), timesteps, x0)

    @property
    def channels(self) -> int:
        return self.u.shape[1] // 2

    @property
    def x(self) -> torch.Tensor:
        """The latent being sampled: a view of U's first C channels."""
        return self.u[:, : self.channels]


def run(plan: Plan, denoise: Denoise, buffers: Buffers, offset: float = 0.0, backend: str = "auto",
        progress: Callable[[int], None] | None = None, step_offset: float = 0.0) -> torch.Tensor:
    """Sample x_0 from x_T into `buffers` (the condition must already be in U[:, C:]); returns the
    view `buffers.x`.

    x_T = z + offset z_c is drawn from `buffers.seeds`; `step_offset` adds the offset term to the
    noise of ancestral steps. `backend` picks the kernels (bsldm_fast.kernels).
    """
    if buffers.timesteps.shape[0] != len(plan):
        raise ValueError(f"buffers for {buffers.timesteps.shape[0]} steps, a plan of {len(plan)}")
    u, seeds, x = buffers.u, buffers.seeds, buffers.x
    initial_latent(seeds, offset, x, backend)
    for i, p in enumerate(plan.entries):
        eps = denoise(u, buffers.timesteps[i])
        if isinstance(p, DDPMStep):
            ddpm_step(x, eps, seeds, i, p, x, step_offset, backend)
        elif isinstance(p, DDIMStep):
            ddim_step(x, eps, seeds, i, p, x, step_offset, backend)
        else:
            dpmpp_2m_step(x, eps, buffers.x0 if i else None, p, x, buffers.x0, backend)
        if progress is not None:
            progress(i)
    return x
