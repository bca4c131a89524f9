"""The tensor pipeline: CXR images in [-1, 1] -> soft-tissue images in [-1, 1].

encode the CXR once -> sample the soft-tissue latent conditioned on it -> decode. It knows tensors
only; files and intensity mapping live in `io` and `suppressor`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from . import kernels
from .config import ModelConfig
from .diffusion import Schedule, sample, spaced_timesteps
from .diffusion.noise import StepNoise, initial_latent, seed_tensor
from .kernels.sampling import sample_fused
from .models import VQGAN, UNet

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SAMPLER = "ddpm"
DEFAULT_STEPS = {"ddpm": 10, "ddim": 20, "dpmpp": 20}
"""Chosen by the few-step quality study (benchmarks/quality_study.py, results/quality-demo-*): DDPM
with 10 respaced steps is the fewest U-Net evaluations within 0.3 dB PSNR and 0.005 BSR of the
original 1000-step DDPM. `steps=1000` is the original loop."""
STEP_BACKENDS = kernels.BACKENDS
"""'reference': the unfused PyTorch samplers (diffusion/samplers.py), the specification; 'auto',
'cpp', 'cuda', 'triton': the fused kernels of bsldm_fast.kernels ('auto' picks the best available)."""


class LatentDenoiser:
    """(U, t) -> eps of the soft-tissue channels: hides the U-Net's layout, dtype and conditioning.

    With `condition_scaling="original"` the CXR latent is scaled by sqrt(alpha_bar_t), as the
    original training noised it.
    """

    def __init__(self, unet: UNet, config: ModelConfig, schedule: Schedule, dtype: torch.dtype,
                 channels_last: bool = False):
        self.unet = unet
        self.channels = config.diffusion.latent_channels
        self.dtype = dtype
        self.channels_last = channels_last
        self.cond_scale: torch.Tensor | None = None
        if config.diffusion.condition_scaling == "original":
            self.cond_scale = schedule.alphas_cumprod.sqrt().float()

    def __call__(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.cond_scale is not None:
            if self.cond_scale.device != u.device:
                self.cond_scale = self.cond_scale.to(u.device)
            scale = self.cond_scale[t].view(-1, 1, 1, 1)
            u = torch.cat([u[:, : self.channels], u[:, self.channels :] * scale], dim=1)
        u = u.to(self.dtype)
        if self.channels_last:
            u = u.contiguous(memory_format=torch.channels_last)
        return self.unet(u, t)[:, : self.channels].float()


def _on(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module on `device` in `dtype`, in eval mode; a copy when that needs a conversion, so the
    caller's model is never changed behind its back."""
    param = next(module.parameters())
    if param.device != device or param.dtype != dtype:
        module = copy.deepcopy(module).to(device, dtype)
    return module.eval()


class Pipeline:
    """A loaded model on one device and precision, ready to sample.

    `step_backend` picks how each sampler step runs: the fused kernels ('auto', 'cpp', 'cuda',
    'triton'; see bsldm_fast.kernels) or the unfused PyTorch reference ('reference'). Both draw the
    same Philox noise, so they give the same result to float32 rounding.
    """

    def __init__(self, config: ModelConfig, vqgan: VQGAN, unet: UNet,
                 device: torch.device | str = "cpu", precision: str = "fp32",
                 step_backend: str = "auto"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
        if step_backend not in STEP_BACKENDS:
            raise ValueError(f"unknown step_backend {step_backend!r}; choose one of {STEP_BACKENDS}")
        self.config = config
        self.device = torch.device(device)
        self.step_backend = (step_backend if step_backend == "reference"
                             else kernels.resolve(step_backend, self.device))
        """'reference', or the kernel backend that 'auto' resolved to on this device."""
        self.precision = precision
        dtype = PRECISIONS[precision]
        # Reduced precision on the CPU pays off only in channels-last layout (oneDNN's bf16 path).
        channels_last = dtype != torch.float32 and self.device.type == "cpu"
        self.vqgan = _on(vqgan, self.device, torch.float32)
        self.unet = _on(unet, self.device, dtype)
        # At 1024² the VQGAN's encoder and decoder cost more than five U-Net steps each, so in
        # reduced precision they run in it too; the codebook search stays float32, so near-ties
        # between codes are decided as in fp32 up to the encoder's rounding.
        self.vq_dtype = dtype
        self.vq_encoder, self.vq_decoder = self.vqgan.encoder, self.vqgan.decoder
        if dtype != torch.float32:
            self.vq_encoder = _on(self.vqgan.encoder, self.device, dtype)
            self.vq_decoder = _on(self.vqgan.decoder, self.device, dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
            self.vq_encoder = self.vq_encoder.to(memory_format=torch.channels_last)
            self.vq_decoder = self.vq_decoder.to(memory_format=torch.channels_last)
        self.schedule = Schedule.from_config(config.diffusion)
        self.denoiser = LatentDenoiser(self.unet, config, self.schedule, dtype, channels_last)

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """CXR images [B, 1, S, S] in [-1, 1] -> quantised latents [B, 4, S/8, S/8]."""
        images = images.to(self.device, self.vq_dtype).contiguous(memory_format=self.memory_format)
        return self.quantize(self.vq_encoder(images).float().contiguous())

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Each latent vector of z [B, 4, h, w] (float32) replaced by its nearest code."""
        if self.step_backend == "reference":
            return self.vqgan.quantizer(z)
        codes = self.vqgan.quantizer.embedding.weight
        return kernels.vq_quantize(z, codes, backend=self.step_backend)[0]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 1, S, S], float32; like the original, sampled latents are decoded
        unquantised unless `config.diffusion.quantize_sample` (applied in `run`)."""
        latents = latents.to(self.vq_dtype).contiguous(memory_format=self.memory_format)
        return self.vq_decoder(latents).float().contiguous()

    @torch.inference_mode()
    def sample_latents(self, cond: torch.Tensor, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER,
                       steps: int | None = None, offset_noise: bool = False,
                       progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Soft-tissue latents for CXR latents `cond`, one seed per sample."""
        if len(seeds) != cond.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {cond.shape[0]}")
        steps = DEFAULT_STEPS.get(sampler, 20) if steps is None else steps
        timesteps = spaced_timesteps(self.schedule.num_timesteps, steps)
        shape = tuple(cond.shape[1:])
        coefficient = self.config.diffusion.offset_noise_coefficient if offset_noise else 0.0
        cond = cond.to(self.device, torch.float32)
        if self.step_backend != "reference":
            return sample_fused(sampler, self.denoiser, cond, seed_tensor(seeds, self.device),
                                self.schedule, timesteps, coefficient, self.step_backend, progress)
        x = initial_latent(seeds, shape, coefficient, self.device)
        noise = StepNoise(seeds, shape, self.device)
        return sample(sampler, self.denoiser, x, cond, self.schedule, timesteps, noise, progress)

    def run(self, images: torch.Tensor, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER,
            steps: int | None = None, offset_noise: bool = False,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """CXR images [B, 1, S, S] in [-1, 1] -> soft-tissue images [B, 1, S, S] (unclamped)."""
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"expected images of shape [B, 1, {size}, {size}], got {tuple(images.shape)}")
        cond = self.encode(images)
        latents = self.sample_latents(cond, seeds, sampler, steps, offset_noise, progress)
        if self.config.diffusion.quantize_sample:
            latents = self.quantize(latents)
        return self.decode(latents)

