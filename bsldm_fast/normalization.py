"""Intensity handling around the model, on the [0, 1] display scale:
- input normalisation (`config.input_normalization`): an affine map of the display values into the
  range the model was trained on, and its inverse for the model's output;
- the output anchor (`config.output_anchor`): the output's low spatial frequencies taken from the
  input."""

from __future__ import annotations

import numpy as np
import torch

import math

from .config import InputNormalization, OutputAnchor


def affine(image: torch.Tensor | np.ndarray, norm: InputNormalization) -> tuple[float, float]:
    """(scale, offset) with model input = scale * image + offset, for one [0, 1] display image.

    'none' gives (1, 0). 'percentile' sends the image's low/high percentiles to low/high_value; an
    image too flat to have two distinct percentiles is left as it is rather than blown up.
    """
    if norm.mode == "none":
        return 1.0, 0.0
    values = torch.as_tensor(image, dtype=torch.float32).flatten()
    if values.numel() > 1 << 20:  # percentiles of a regular subsample: same answer, less work
        values = values[:: values.numel() // (1 << 20) + 1]
    q = torch.tensor([norm.low_percentile, norm.high_percentile], dtype=torch.float32) / 100.0
    low, high = torch.quantile(values, q).tolist()
    if not high - low > 1e-3:
        return 1.0, 0.0
    scale = (norm.high_value - norm.low_value) / (high - low)
    return scale, norm.low_value - scale * low


def invert(image: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """The model's output back on the input's own display scale."""
    return (image - offset) / scale


def low_pass(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, 1, H, W] images with standard deviation `sigma` pixels, edges mirrored
    (a radiograph's border is not darker than its inside, as zero padding would make it)."""
    radius = min(math.ceil(3.0 * sigma), images.shape[-2] - 1, images.shape[-1] - 1)
    if radius < 1:
        return images
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype)
    out = torch.nn.functional.pad(images, (radius, radius, radius, radius), mode="reflect")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1))


def anchor(soft: torch.Tensor, image: torch.Tensor, spec: OutputAnchor) -> torch.Tensor:
    """The model's soft-tissue images [B, 1, H, W] with their low frequencies (below
    `spec.sigma` x width) replaced by those of the input images (same shape) plus `spec.offset`.
    'none' returns `soft` itself."""
    if spec.mode == "none":
        return soft
    if soft.shape != image.shape:
        raise ValueError(f"output {tuple(soft.shape)} and input {tuple(image.shape)} differ in shape")
    return soft + low_pass(image + spec.offset - soft, spec.sigma * soft.shape[-1])
