"""Input intensity normalisation (`config.input_normalization`): an affine map of the display
values into the range the model was trained on, and its inverse for the model's output."""

from __future__ import annotations

import numpy as np
import torch

from .config import InputNormalization


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
