"""The three networks as the pipeline calls them: float32 in and out, whatever they compute in.

Each wrapper casts its input to the dtype of the network's weights and, for channels-last weights
(oneDNN's and cuDNN's fast reduced-precision layout), lays it out channels-last; its output comes
back float32 and contiguous. The same modules run eagerly, under torch.compile, and export to ONNX
(engines/graphs.py), so every backend computes one contract:

- `LatentEncoder`: image [B, 1, S, S] -> continuous latent z [B, 4, S/8, S/8] (before the codebook);
- `LatentDenoiser`: (U = [x_t | c] [B, 8, h, w], t [B]) -> eps [B, 4, h, w], conditioning inside;
- `LatentDecoder`: latent [B, 4, h, w] -> image [B, 1, S, S].
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..diffusion.conditioning import condition_scale, scale_condition


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _Cast(nn.Module):
    def __init__(self, memory_format: torch.memory_format):
        super().__init__()
        self.memory_format = memory_format

    def prepare(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # contiguous_format also packs a strided view (U[:, :4] of the sampler's buffer) once.
        return x.to(dtype).contiguous(memory_format=self.memory_format)


class LatentCoder(_Cast):
    """A VQGAN half with float32 I/O: the encoder (image -> z) or the decoder (latent -> image)."""

    def __init__(self, network: nn.Module, memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(memory_format)
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.prepare(x, _dtype(self.network))).float().contiguous()


LatentEncoder = LatentDecoder = LatentCoder


class LatentDenoiser(_Cast):
    """(U, t) -> eps of the soft-tissue channels; the conditioning rule is
    `diffusion.conditioning`'s, the one training uses."""

    def __init__(self, unet: nn.Module, config: ModelConfig,
                 memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__(memory_format)
        self.unet = unet
        self.channels = config.diffusion.latent_channels
        scale = condition_scale(config.diffusion)
        self.register_buffer("cond_scale", None if scale is None else scale.to(next(unet.parameters()).device))

    def forward(self, U: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # noqa: N803 (the graph's I/O name)
        if self.cond_scale is not None:
            c = self.channels
            U = torch.cat([U[:, :c], scale_condition(U[:, c:], t, self.cond_scale)], dim=1)
        return self.unet(self.prepare(U, _dtype(self.unet)), t)[:, : self.channels].float()
