"""The BS-LDM VQGAN: monai-generative's `VQVAE` (Tudosiu et al. 2022), layer for layer.

Parameter names follow monai-generative's module tree (`encoder.blocks.N.conv.weight`, ...), so the
official checkpoints map onto this module by renaming only the codebook
(`quantizer.quantizer.*` -> `quantizer.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VQGANConfig


class ConvBlock(nn.Module):
    """A convolution optionally followed by ReLU: monai's `Convolution` with adn_ordering="DA".

    Dropout is 0 in BS-LDM, so "D" is the identity and is left out.
    """

    def __init__(self, conv: nn.Module, relu: bool):
        super().__init__()
        self.conv = conv
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


def _conv3x3(in_channels: int, out_channels: int, relu: bool) -> ConvBlock:
    return ConvBlock(nn.Conv2d(in_channels, out_channels, 3, padding=1), relu)


class ResidualUnit(nn.Module):
    """relu(x + conv2(relu(conv1(x)))): monai-generative's `VQVAEResidualUnit`."""

    def __init__(self, channels: int, res_channels: int):
        super().__init__()
        self.conv1 = _conv3x3(channels, res_channels, relu=True)
        self.conv2 = _conv3x3(res_channels, channels, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class Encoder(nn.Module):
    """Stride-2, kernel-4 convolutions, each followed by residual units; a 3x3 conv to the latent."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = config.in_channels
        for channels, res_channels in zip(config.channels, config.res_channels):
            blocks.append(
                ConvBlock(nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), relu=True)
            )
            blocks.extend(ResidualUnit(channels, res_channels) for _ in range(config.num_res_layers))
            in_channels = channels
        blocks.append(_conv3x3(in_channels, config.embedding_dim, relu=False))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Decoder(nn.Module):
    """The encoder mirrored, with stride-2 transposed convolutions; no activation on the output."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        channels = list(reversed(config.channels))
        res_channels = list(reversed(config.res_channels))
        blocks: list[nn.Module] = [_conv3x3(config.embedding_dim, channels[0], relu=False)]
        for i, (ch, res_ch) in enumerate(zip(channels, res_channels)):
            blocks.extend(ResidualUnit(ch, res_ch) for _ in range(config.num_res_layers))
            last = i == len(channels) - 1
            out_ch = config.out_channels if last else channels[i + 1]
            up = nn.ConvTranspose2d(ch, out_ch, 4, stride=2, padding=1, output_padding=0)
            blocks.append(ConvBlock(up, relu=not last))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Codebook(nn.Module):
    """Nearest-neighbour vector quantiser (van den Oord et al. 2017) with monai's EMA buffers."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.num_embeddings, config.embedding_dim)
        self.embedding.weight.requires_grad_(False)
        # Training state of the EMA codebook update; kept so that a model directory can resume.
        self.register_buffer("ema_cluster_size", torch.zeros(config.num_embeddings))
        self.register_buffer("ema_w", self.embedding.weight.data.clone())

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code index of each latent vector: [B, D, H, W] -> [B, H, W]."""
        b, d, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.embedding.weight.float()
        # The same expansion and argmax as monai-generative, so near-ties resolve identically.
        distances = (
            (flat**2).sum(dim=1, keepdim=True)
            + (codes.t() ** 2).sum(dim=0, keepdim=True)
            - 2 * torch.mm(flat, codes.t())
        )
        return torch.max(-distances, dim=1)[1].view(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes of the indices, channels first: [B, H, W] -> [B, D, H, W]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.embed(self.indices(z)).to(z.dtype)


class VQGAN(nn.Module):
    """Image <-> quantised latent: 1 x S x S -> embedding_dim x S/8 x S/8 for three stages."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = Codebook(config)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output, before quantisation."""
        return self.encoder(images)

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Quantised latent: monai-generative's `encode_stage_2_inputs`."""
        return self.quantizer(self.encoder(images))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image from a latent; like the original, a sampled latent is decoded unquantised."""
        return self.decoder(latent)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_latent(images))
