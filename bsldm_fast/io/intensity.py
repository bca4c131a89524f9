"""Pixel values <-> the [0, 1] display scale, two ways (the original's `ToTensor`, generalised).

- `pixels_to_unit` / `unit_to_pixels`: what inference does to an array, and undoes on its result.
  uint8 and uint16 use their full range (x / 255, x / 65535); float images are mapped from the
  image's own [min, max] and back, so a calibrated scale survives the round trip.
- `scale_by_dtype`: what the metrics do. Integers as above, floats taken to be on [0, 1] already
  (a result of `Suppressor.suppress_unit`, say) and left as they are; not invertible, float64.

Torch-free, so the file layer can use it.
"""

from __future__ import annotations

import numpy as np


def pixels_to_unit(image: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """An image as float32 in [0, 1] (integers by their type's range, floats min-max), and the
    (low, high) range that `unit_to_pixels` maps it back with."""
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


def unit_to_pixels(unit: np.ndarray, value_range: tuple[float, float], dtype: np.dtype) -> np.ndarray:
    """Inverse of `pixels_to_unit`: clip to [0, 1], scale back, round for integer types."""
    low, high = value_range
    values = np.clip(unit, 0.0, 1.0) * (high - low) + low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def scale_by_dtype(image: np.ndarray) -> np.ndarray:
    """A 2-D image as float64: uint8 / 255, uint16 / 65535, floats as they are (taken as [0, 1])."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grey-scale image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError("image contains NaN or infinite values")
        return image.astype(np.float64)
    raise TypeError(f"unsupported image dtype {image.dtype}; use uint8, uint16 or float in [0, 1]")
