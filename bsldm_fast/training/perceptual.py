"""The VQGAN's perceptual loss: LPIPS with VGG-16 (Zhang et al. 2018), as BS-LDM uses it.

The original calls monai-generative's `PerceptualLoss(spatial_dims=2, network_type="vgg")`, which
is `lpips.LPIPS(net="vgg")` v0.1: ImageNet scaling of inputs in [-1, 1] (a 1-channel radiograph
broadcasts to 3 channels), VGG-16 ReLU features at 5 depths, unit-normalised over channels, squared
differences weighted by learned non-negative 1x1 convolutions, averaged over space, summed over depths.

The pretrained weights are never downloaded: they are read from a local file (or several,
':'-separated), in either naming:
- LPIPS's own state dict (`net.slice1.0.weight`, ..., `lin0.model.1.weight`, ...), or
- torchvision's `vgg16` state dict (`features.0.weight`, ...) plus LPIPS's `vgg.pth` (`lin0...`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# VGG-16 `features`: conv widths, with "M" for the 2x2 max-pools (torchvision's layout and indices).
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: `features` index ranges of its 5 slices.
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
CHANNELS = (64, 128, 256, 512, 512)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class PerceptualWeightsError(ValueError):
    """The perceptual-loss weights file is missing or does not fit LPIPS-VGG."""


def _features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    ch = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers.extend([nn.Conv2d(ch, int(v), 3, padding=1), nn.ReLU()])
            ch = int(v)
    return layers


class _LinLayer(nn.Module):
    """LPIPS's NetLinLayer: (dropout,) 1x1 conv to one channel, no bias. Dropout is off in eval mode."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _VGGSlices(nn.Module):
    def __init__(self):
        super().__init__()
        features = _features()
        for k, (start, stop) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            for i in range(start, stop):
                block.add_module(str(i), features[i])
            self.add_module(f"slice{k}", block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for k in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{k}")(x)
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """LPIPS-VGG v0.1 distance between images in [-1, 1]: [B, C, H, W] x 2 -> [B] (frozen, eval)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.net = _VGGSlices()
        for i, ch in enumerate(CHANNELS):
            self.add_module(f"lin{i}", _LinLayer(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        # Always in eval mode (as monai-generative leaves it): no dropout in the linear heads.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.net((x - self.shift) / self.scale)
        fy = self.net((y - self.shift) / self.scale)
        total = 0.0
        for i, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}")((a - b) ** 2).mean(dim=(2, 3))
        return total.flatten()  # type: ignore[union-attr]


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PerceptualWeightsError(f"perceptual-loss weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise PerceptualWeightsError(f"{path}: cannot read weights ({error})") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PerceptualWeightsError(f"{path}: expected a state dict")
    return state


def _rename(key: str) -> str | None:
    """LPIPS naming for a key in LPIPS or torchvision naming; None for keys LPIPS does not use."""
    key = key.removeprefix("module.").removeprefix("perceptual_function.")
    if key.startswith("features."):
        index = int(key.split(".")[1])
        for k, (start, stop) in enumerate(SLICES, start=1):
            if start <= index < stop:
                return f"net.slice{k}." + key.removeprefix("features.")
        return None
    if key.startswith(("net.slice", "lin")) and not key.startswith("lins."):
        return key
    return None


def load_lpips(spec: str) -> LPIPS:
    """LPIPS-VGG with weights from `spec`: file(s) separated by ':' (os.pathsep), or 'random'.

    'random' keeps the random initialisation (for tests only: the loss is then not perceptual).
    """
    model = LPIPS()
    if spec == "random":
        logger.warning("perceptual loss with RANDOM weights: for tests only, not a perceptual loss")
        with torch.no_grad():
            for i in range(len(CHANNELS)):
                getattr(model, f"lin{i}").model[1].weight.abs_()
        return model
    state: dict[str, torch.Tensor] = {}
    for part in str(spec).split(os.pathsep):
        for key, value in _read(Path(part).expanduser()).items():
            name = _rename(key)
            if name is not None:
                state[name] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise PerceptualWeightsError(
            f"{spec}: LPIPS-VGG weights incomplete, missing {len(missing)} tensors "
            f"(e.g. {', '.join(missing[:4])}); give torchvision's vgg16 weights and LPIPS's vgg.pth "
            "(':'-separated), or one LPIPS state dict"
        )
    bad = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise PerceptualWeightsError(f"{spec}: wrong shapes for {', '.join(bad[:4])}")
    model.load_state_dict({k: state[k].float() for k in expected})
    return model
