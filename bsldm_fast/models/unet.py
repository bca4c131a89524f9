"""The BS-LDM noise estimator: OpenAI guided-diffusion's `UNetModel` (Dhariwal & Nichol 2021).

Module and parameter names are those of guided-diffusion (`input_blocks.N.M.in_layers.2.weight`,
...), so the official checkpoints load by name. Two deliberate differences, both numerically
equivalent to float rounding:
- attention runs through `F.scaled_dot_product_attention` (fused kernels; exports to ONNX as
  MatMul-Softmax-MatMul, which TensorRT fuses) instead of two einsums;
- no autograd-Function checkpointing on the inference path, so the graph exports and compiles.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: guided-diffusion starts every residual branch as the identity."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in (at least) float32 whatever the activation dtype (guided-diffusion)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            if x.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
                # The CPU kernel accumulates half-precision input in float32 itself: the same
                # normalisation without copying the activation to float32 and back (9x faster per
                # call on the paper U-Net; the tests compare it with the upcast path). Exported
                # graphs keep the explicit upcast, since their runtimes may not accumulate so.
                return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)
        return super().forward(x)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class Resample(nn.Module):
    """Parameter-free 2x resampling inside a residual block: nearest up, or 2x2 average-pool down."""

    def __init__(self, up: bool):
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling (up/down)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if self.updown:
            self.h_upd = Resample(up)
            self.x_upd = Resample(up)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 new_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels do not split into {self.num_heads} heads")
        self.new_order = new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length = qkv.shape[-1]
        ch = c // self.num_heads
        if self.new_order:
            # QKVAttention: [q (all heads) | k | v]
            q, k, v = (t.reshape(b, self.num_heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            # QKVAttentionLegacy: per head [q | k | v]
            q, k, v = qkv.reshape(b, self.num_heads, 3 * ch, length).split(ch, dim=2)
        h = F.scaled_dot_product_attention(
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )  # [B, heads, T, ch]
        h = h.transpose(-1, -2).reshape(b, c, length)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Plain strided-conv downsampling (used when resblock_updown is off)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest upsampling and a 3x3 conv (used when resblock_updown is off)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta([x_t | c], t): the conditional noise estimator of BS-LDM."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = mc * 4
        ss = config.use_scale_shift_norm

        def res(ch: int, out: int | None = None, **kw: bool) -> ResBlock:
            return ResBlock(ch, emb_dim, config.dropout, out, use_scale_shift_norm=ss, **kw)

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch, heads, config.num_head_channels, config.use_new_attention_order)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        ch = input_ch = int(config.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(config.in_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * mc))]
                ch = int(mult * mc)
                if ds in config.attention_resolutions:
                    layers.append(attn(ch, config.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(config.channel_mult) - 1:
                down = res(ch, ch, down=True) if config.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(res(ch), attn(ch, config.num_heads), res(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(config.channel_mult))[::-1]:
            for i in range(config.num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), int(mc * mult))]
                ch = int(mc * mult)
                if ds in config.attention_resolutions:
                    layers.append(attn(ch, config.heads_upsample))
                if level and i == config.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if config.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(input_ch, config.out_channels, 3, padding=1)),
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.config.model_channels)
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype)).to(x.dtype)
        skips = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)
