"""The network runners of the GPU pipeline: the same three graphs on PyTorch or on TensorRT engines.

A runner has three calls with float32 I/O, the contracts of `graphs.EncoderGraph`, `UNetGraph` and
`DecoderGraph` (the modules that export to ONNX and become the engines):

- `encode(images [B, 1, S, S]) -> quantised CXR latent [B, 4, h, w]`;
- `denoise(U [B, 8, h, w], t [B] int64) -> eps [B, 4, h, w]` (conditioning rule inside);
- `decode(latent [B, 4, h, w]) -> image [B, 1, S, S]`.

So `gpu_pipeline.GraphPipeline` has one code path whatever runs the networks. Every call must be
capturable in a CUDA graph after one warm-up call: no host synchronisation, no host-to-device copies.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..config import ModelConfig
from ..models import VQGAN, UNet
from ..pipeline import PRECISIONS, _on
from .graphs import BatchProfile, graph_module

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
"""torch.compile modes that leave CUDA graphs to us: 'reduce-overhead' and 'max-autotune' capture
their own graphs, which cannot nest inside the pipeline's capture."""


class Runner(Protocol):
    """What `GraphPipeline` calls (see the module docstring)."""

    name: str
    precision: str

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class TorchRunner:
    """The three graphs as PyTorch modules in `precision` (VQGAN and U-Net alike), eager or compiled.

    `compile=True` wraps each in `torch.compile(mode=compile_mode, dynamic=False)`: one compilation
    per batch size, done by the first call (the pipeline's warm-up, before capture). On CUDA with
    reduced precision the weights are channels-last, the layout cuDNN's fastest fp16/bf16
    convolutions want.
    """

    def __init__(self, config: ModelConfig, vqgan: VQGAN, unet: UNet,
                 device: torch.device | str = "cuda", precision: str = "bf16",
                 compile: bool = False, compile_mode: str = "default",
                 channels_last: bool | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}")
        if compile and compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {compile_mode!r} "
                             "(the pipeline captures its own CUDA graph)")
        self.device = torch.device(device)
        self.precision = precision
        self.compiled = compile
        self.name = "torch-compile" if compile else "torch"
        dtype = PRECISIONS[precision]
        if channels_last is None:
            channels_last = self.device.type == "cuda" and dtype != torch.float32
        converted = _on(vqgan, self.device, dtype), _on(unet, self.device, dtype)
        if channels_last:
            # The layout change is in place: never on the caller's own modules.
            converted = tuple(copy.deepcopy(m) if m is original else m
                              for m, original in zip(converted, (vqgan, unet)))
        vqgan, unet = converted
        self.modules = {name: graph_module(name, config, vqgan, unet)
                        for name in ("encoder", "unet", "decoder")}
        if channels_last:
            for module in self.modules.values():
                module.to(memory_format=torch.channels_last)
        self._encode = self._wrap(self.modules["encoder"], compile, compile_mode)
        self._denoise = self._wrap(self.modules["unet"], compile, compile_mode)
        self._decode = self._wrap(self.modules["decoder"], compile, compile_mode)

    @staticmethod
    def _wrap(module: nn.Module, compile: bool, mode: str):
        return torch.compile(module, mode=mode, dynamic=False) if compile else module

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encode(images)

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._denoise(u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode(latents)


class TensorRTRunner:
    """The three cached TensorRT engines of a model directory (`tensorrt.load_engines`).

    TensorRT does its lazy set-up on an engine's first enqueue; the pipeline's warm-up call does
    that before capture.
    """

    def __init__(self, model_dir: str | Path, precision: str = "fp16",
                 device: torch.device | str = "cuda", profile: BatchProfile = BatchProfile()):
        from .tensorrt import load_engines

        self.name = "tensorrt"
        self.precision = precision
        self.device = torch.device(device)
        self.engines = load_engines(model_dir, precision, profile, self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.engines.vqgan.encode_latent(images)

    def denoise(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.engines.denoiser(u, t)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.engines.vqgan.decode(latents)
