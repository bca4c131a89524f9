"""The VQGAN's patch discriminator: monai-generative's `PatchDiscriminator` (pix2pixHD), layer for layer.

BS-LDM uses `PatchDiscriminator(spatial_dims=2, in_channels=1, num_layers_d=3, num_channels=64)`:
a stride-2 conv + LeakyReLU(0.2), `num_layers_d` conv + BatchNorm + LeakyReLU(0.2) layers doubling
the channels (the last one stride 1), and a 1-channel conv, all 4x4 with padding 1. Parameter names
follow monai's (`initial_conv.conv.weight`, `0.adn.N.weight`, ...) so its checkpoints load by name.
"""

from __future__ import annotations

import torch
from torch import nn


class _ADN(nn.Module):
    """monai's ADN block with ordering 'NDA' and no dropout: [BatchNorm] then LeakyReLU(0.2)."""

    def __init__(self, channels: int, norm: bool):
        super().__init__()
        if norm:
            self.N = nn.BatchNorm2d(channels)
        self.A = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "N"):
            x = self.N(x)
        return self.A(x)


class _Conv(nn.Module):
    """monai's `Convolution`: conv, then (optionally) norm and activation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bias: bool,
                 norm: bool = False, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1, bias=bias)
        if act:
            self.adn = _ADN(out_channels, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.adn(x) if hasattr(self, "adn") else x


class PatchDiscriminator(nn.Sequential):
    """Least-squares patch-GAN critic of BS-LDM's VQGAN stage: image [B, 1, S, S] -> logits [B, 1, s, s]."""

    def __init__(self, in_channels: int = 1, num_layers: int = 3, channels: int = 64):
        super().__init__()
        self.add_module("initial_conv", _Conv(in_channels, channels, stride=2, bias=True))
        ch = channels
        for layer in range(num_layers):
            stride = 1 if layer == num_layers - 1 else 2
            self.add_module(str(layer), _Conv(ch, 2 * ch, stride, bias=False, norm=True))
            ch *= 2
        self.add_module("final_conv", _Conv(ch, 1, stride=1, bias=True, act=False))
        self.apply(_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The logits of the last layer (monai returns every layer's output; BS-LDM uses the last)."""
        return super().forward(x)


def _init(module: nn.Module) -> None:
    """monai's initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class PairedCritic(nn.Module):
    """Runs the discriminator on fake and real images as two separate batches in one forward call.

    The original calls the critic twice (so BatchNorm sees each batch alone); under DDP a module must
    be called once per backward, hence this wrapper.
    """

    def __init__(self, discriminator: PatchDiscriminator):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.discriminator(fake), self.discriminator(real)
