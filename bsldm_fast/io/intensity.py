"""Pixel values <-> the model's [0, 1] range (the original's `ToTensor`, generalised).

- uint8 and uint16 use their full range: x / 255 or x / 65535;
- float images are mapped from the image's own [min, max] and back, so a
  calibrated scale survives the round trip.
"""

from __future__ import annotations

import numpy as np


def to_unit(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """An image as float32 in [0, 1], and the (low, high) range that maps it back."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0, (0.0, 255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0, (0.0, 65535.0)
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            bad = int(image.size - np.isfinite(image).sum())
            raise ValueError(f"image contains NaN or infinite values ({bad} of {image.size} pixels)")
        low, high = float(image.min()), float(image.max())
        span = high - low if high > low else 1.0
        return ((image - low) / span).astype(np.float32), (low, low + span)
    raise TypeError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float")


def from_unit(unit: np.ndarray, value_range: tuple[float, float], dtype: np.dtype) -> np.ndarray:
    """Inverse of `to_unit`: clip to [0, 1], scale back, round for integer types."""
    low, high = value_range
    values = np.clip(unit, 0.0, 1.0) * (high - low) + low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)
