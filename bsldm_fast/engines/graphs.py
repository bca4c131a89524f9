"""The three networks that compile to engines, as export-ready modules with fixed float32 I/O.

One class per exported network with its input/output names, dynamic axes, batch profile and a
sample input (the layout of TensorRT's demo_diffusion `BaseModel`). Every graph takes and returns
float32 whatever its compute precision, so an engine of any precision is a drop-in for the PyTorch
path; the casts at the edges cost nothing next to the convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..models import VQGAN, UNet
from ..models.latent import LatentDecoder, LatentDenoiser, LatentEncoder
from ..precision import PRECISIONS

GRAPH_NAMES = ("encoder", "decoder", "unet")

# Compute precisions an ONNX graph can carry. fp8/int8 are Q/DQ graphs derived from the fp32 one.
ONNX_PRECISIONS = PRECISIONS


@dataclass(frozen=True)
class BatchProfile:
    """min/opt/max batch of a TensorRT optimisation profile; spatial sizes are the model's, fixed."""

    min: int = 1
    opt: int = 1
    max: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self}")

    def text(self) -> str:
        return f"{self.min}-{self.opt}-{self.max}"


@dataclass(frozen=True)
class GraphSpec:
    """Names, shapes and dtypes of one exported graph's inputs and outputs (axis 0 is the batch)."""

    name: str
    inputs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    """Input name -> (shape without the batch, dtype)."""
    outputs: dict[str, tuple[int, ...]]
    """Output name -> shape without the batch (always float32)."""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "batch"} for name in (*self.inputs, *self.outputs)}

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Full input shapes at a batch size."""
        return {name: (batch, *shape) for name, (shape, _) in self.inputs.items()}

    def sample_inputs(self, batch: int, generator: torch.Generator | None = None,
                      num_timesteps: int = 1000) -> dict[str, torch.Tensor]:
        """Random inputs in each input's natural range (images in [-1, 1], timesteps in [0, T))."""
        feeds = {}
        for name, (shape, dtype) in self.inputs.items():
            if dtype == torch.int64:
                feeds[name] = torch.randint(0, num_timesteps, (batch, *shape), generator=generator)
            elif name == "image":
                feeds[name] = torch.rand((batch, *shape), generator=generator) * 2 - 1
            else:
                feeds[name] = torch.randn((batch, *shape), generator=generator)
        return feeds


def graph_spec(name: str, config: ModelConfig) -> GraphSpec:
    """The I/O of graph `name` ('encoder', 'decoder' or 'unet') for a model config."""
    size, latent = config.image_size, config.latent_size
    channels = config.diffusion.latent_channels
    if name == "encoder":
        return GraphSpec(name, {"image": ((config.vqgan.in_channels, size, size), torch.float32)},
                         {"latent": (channels, latent, latent)})
    if name == "decoder":
        return GraphSpec(name, {"latent": ((channels, latent, latent), torch.float32)},
                         {"image": (config.vqgan.out_channels, size, size)})
    if name == "unet":
        return GraphSpec(
            name,
            {"U": ((2 * channels, latent, latent), torch.float32), "t": ((), torch.int64)},
            {"eps": (channels, latent, latent)},
        )
    raise ValueError(f"unknown graph {name!r}; choose one of {GRAPH_NAMES}")


class EncoderGraph(nn.Module):
    """image [B, 1, S, S] -> quantised latent [B, 4, S/8, S/8]: `LatentEncoder`, then the codebook.

    The nearest-code search runs in float32 on the float32 encoder output (`Codebook.indices`), so
    a reduced-precision encoder cannot flip near-tied codes through the distance arithmetic itself.
    The PyTorch runners search with the fused `kernels.vq_quantize` instead, tested against it.
    """

    def __init__(self, vqgan: VQGAN):
        super().__init__()
        self.encoder = LatentEncoder(vqgan.encoder)
        self.quantizer = vqgan.quantizer

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(image)).float()


def graph_module(name: str, config: ModelConfig, vqgan: VQGAN, unet: UNet) -> nn.Module:
    """The export wrapper of graph `name` around the (already converted) networks, in eval mode."""
    if name == "encoder":
        module: nn.Module = EncoderGraph(vqgan)
    elif name == "decoder":
        module = LatentDecoder(vqgan.decoder)
    elif name == "unet":
        module = LatentDenoiser(unet, config)
    else:
        raise ValueError(f"unknown graph {name!r}; choose one of {GRAPH_NAMES}")
    # The wrapper's own buffers (the conditioning scale) go where the networks are.
    return module.to(next(unet.parameters()).device).eval()
