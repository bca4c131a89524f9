"""The baseline: the original BS-LDM inference loop (diaoquesang/BS-LDM, `BS-LDM/ldm_eval.py`), as a
user of that repository runs it, reproduced on our modules so that only the loop differs.

Per image, fp32 eager, under `torch.no_grad`:
  encode the CXR; x = cat(randn, c);
  for each of the 1000 timesteps: eps = U-Net(x, Tensor((t,)).long());
      x = DDPMScheduler.step(eps, t, x) on all 8 channels;
      rebuild the DDPMScheduler (1000 betas computed in Python) with the next clip range;
      x = cat(x[:, :4], c); copy channel 0 to the host as a NumPy preview (`output_feature_map`);
  decode x[:, :4] and copy the image to the host.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from timing import sync

from bsldm_fast.config import DiffusionConfig
from bsldm_fast.models import VQGAN, UNet


def make_scheduler(diffusion: DiffusionConfig, clip_range: float):
    """diffusers' DDPMScheduler as the original builds it (its __init__ computes the betas in Python)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=diffusion.num_train_timesteps, beta_start=diffusion.beta_start,
                         beta_end=diffusion.beta_end, beta_schedule=diffusion.beta_schedule,
                         clip_sample=diffusion.clip_sample, clip_sample_range=clip_range)


@dataclass
class LoopTimes:
    """Wall times of one image through the original loop; `steps` holds each timed step."""

    encode: float
    steps: list[float]
    decode: float
    total_steps: int
    """Steps of the whole loop (the scheduler's timesteps): what `estimate` scales to."""

    def estimate(self, step_seconds: float | None = None) -> float:
        """Seconds for the whole loop, each step costing `step_seconds` (default: the timed mean)."""
        per_step = float(np.mean(self.steps)) if step_seconds is None else step_seconds
        return self.encode + self.decode + self.total_steps * per_step


class OriginalStyle:
    """The original loop over a VQGAN and U-Net in float32 on `device`."""

    def __init__(self, vqgan: VQGAN, unet: UNet, diffusion: DiffusionConfig,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.vqgan = vqgan.to(self.device, torch.float32).eval()
        self.unet = unet.to(self.device, torch.float32).eval()
        self.diffusion = diffusion
        self.channels = diffusion.latent_channels

    def _clip(self, j: int) -> float:
        return self.diffusion.clip_range_start + self.diffusion.clip_range_rate * j

    @torch.no_grad()
    def step(self, model, scheduler, sample: torch.Tensor, cxr: torch.Tensor, j: int, t: torch.Tensor):
        """One iteration of the original loop: (new sample, rebuilt scheduler, host preview)."""
        residual = model(sample, torch.Tensor((t,)).to(self.device).long()).to(self.device)
        # NOTE: the paper U-Net predicts all 8 channels and the original steps them all; the reduced
        # presets (small, tiny) predict 4, so there the step runs on the 4 soft-tissue channels.
        sample = scheduler.step(residual, t, sample[:, : residual.shape[1]]).prev_sample
        scheduler = make_scheduler(self.diffusion, self._clip(j))
        sample = torch.cat((sample[:, : self.channels], cxr), dim=1)
        with warnings.catch_warnings():  # numpy 2 on np.array(tensor), which the original calls
            warnings.simplefilter("ignore", DeprecationWarning)
            preview = np.clip(np.squeeze(np.array(sample[:, 0].detach().to("cpu"))) * 0.5 + 0.5, 0, 1)
        return sample, scheduler, preview

    @torch.no_grad()
    def loop(self, cxr: torch.Tensor, max_steps: int | None = None, model=None) -> tuple[torch.Tensor, list[float], int]:
        """The sampling loop on a CXR latent: (final 8-channel sample, seconds of each step, loop length).

        `max_steps` stops early (timing only: the sample is then unfinished); `model` replaces the
        U-Net (a stub, to time the loop's own overhead).
        """
        model = self.unet if model is None else model
        scheduler = make_scheduler(self.diffusion, self._clip(0))
        noise = torch.randn_like(cxr).to(self.device)
        sample = torch.cat((noise, cxr), dim=1).to(self.device)
        times = []
        timesteps = scheduler.timesteps
        for j, t in enumerate(timesteps):
            if max_steps is not None and j >= max_steps:
                break
            start = time.perf_counter()
            sample, scheduler, _ = self.step(model, scheduler, sample, cxr, j, t)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return sample, times, len(timesteps)

    @torch.no_grad()
    def run(self, image: torch.Tensor, max_steps: int | None = None) -> tuple[np.ndarray, LoopTimes]:
        """One CXR [1, 1, S, S] in [-1, 1] -> (soft-tissue image x255 as the original writes it, times)."""
        if image.shape[0] != 1:
            raise ValueError("the original loop takes one image at a time")
        start = time.perf_counter()
        cxr = self.vqgan.encode_latent(image.to(self.device))
        sync(self.device)
        encode = time.perf_counter() - start
        sample, steps, total = self.loop(cxr, max_steps)
        start = time.perf_counter()
        bs = self.vqgan.decode(sample[:, : self.channels])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            bs = np.squeeze(np.array(bs.detach().to("cpu"))) * 0.5 + 0.5
        decode = time.perf_counter() - start
        return bs * 255, LoopTimes(encode, steps, decode, total)
