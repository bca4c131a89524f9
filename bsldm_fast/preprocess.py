"""Preprocessing: the one place pixels become a network's input and its output becomes pixels again.

Inference (`Suppressor`, and the file layer through it), training (training/data.py), calibration
(engines/quantize.py), the metrics and the data engine all go through here, so a network is
trained, calibrated and measured on exactly the pixels it is run on.

    file  --read_radiograph-->  display image: float32 in [0, 1], upright, dense = bright (DICOM
                                through its Modality and VOI LUTs, MONOCHROME1 inverted)
    array --pixels_to_unit--->  display image, and the range `unit_to_pixels` maps a result back with
    display image --model_input-->  [1, 1, S, S]: `resize`d to the model's size, the config's input
                                normalisation, then [-1, 1] (`to_model_range`)
    model output --model_outputs-->  display images at the inputs' sizes: [0, 1], the normalisation
                                inverted, the config's output anchor, `resize`d back

Training reads files and resizes with the same functions, but applies no input normalisation: the
normalisation maps other scanners' grey levels onto those of the training images, the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import normalization
from .config import ModelConfig
from .io.intensity import pixels_to_unit, scale_by_dtype, unit_to_pixels
from .io.radiograph import Radiograph, read_radiograph

__all__ = [
    "ModelInput", "Radiograph", "from_model_range", "model_input", "model_outputs",
    "pixels_to_unit", "read_at_size", "read_radiograph", "resize", "scale_by_dtype",
    "to_model_range", "unit_to_pixels",
]


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, *size] (an int: square): bilinear with half-pixel centres
    (align_corners=False), antialiased when a side shrinks; `images` itself when the size matches.

    NOTE: plain bilinear reads only the 2 x 2 nearest pixels, so shrinking a 2-3k px radiograph to
    1024 px would alias the fine rib edges; antialiasing widens the filter to the scale factor.
    """
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False,
                         antialias=shrinking)


def to_model_range(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] display values -> the networks' [-1, 1] (the original's `Normalize(0.5, 0.5)`)."""
    return unit * 2.0 - 1.0


def from_model_range(values: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_model_range`."""
    return (values + 1.0) / 2.0


def read_at_size(path, size: int) -> torch.Tensor:
    """A radiograph file (any supported format) as [1, 1, size, size] float32 display values in
    [0, 1]: what `model_input` starts from, before any normalisation. The training loader's reader."""
    unit = read_radiograph(path).unit
    return resize(torch.from_numpy(np.asarray(unit, np.float32))[None, None], size)


@dataclass(frozen=True)
class ModelInput:
    """One display image prepared for the networks, and what `model_outputs` needs to undo it."""

    tensor: torch.Tensor
    """[1, 1, S, S], what the pipeline is fed: 2 * (scale * display + offset) - 1."""
    display: torch.Tensor
    """[1, 1, S, S]: the display image at the model's size before normalisation; the reference of
    the output anchor."""
    scale: float
    offset: float
    """The input normalisation (`normalization.affine`) of this image."""
    size: tuple[int, int]
    """The display image's own (height, width), which its result is resized back to."""


def model_input(unit: np.ndarray, config: ModelConfig) -> ModelInput:
    """A display image (2-D, float in [0, 1], any size) as the networks of `config` take it."""
    if unit.ndim != 2 or min(unit.shape) < 2:
        raise ValueError(f"image of shape {unit.shape} is too small")
    display = resize(torch.from_numpy(np.asarray(unit, np.float32))[None, None], config.image_size)
    scale, offset = normalization.affine(display, config.input_normalization)
    tensor = to_model_range(display * scale + offset)
    return ModelInput(tensor, display, scale, offset, (int(unit.shape[0]), int(unit.shape[1])))


def model_outputs(outputs: torch.Tensor, inputs: Sequence[ModelInput],
                  config: ModelConfig) -> list[np.ndarray]:
    """The networks' outputs [B, 1, S, S] (in [-1, 1], any device and float type) for `inputs`, as
    display images: float32 in [0, 1] at each input's own size."""
    displays = from_model_range(outputs.float()).cpu()
    results = []
    for display, prepared in zip(displays, inputs):
        display = normalization.invert(display[None], prepared.scale, prepared.offset)
        display = normalization.anchor(display, prepared.display, config.output_anchor)
        results.append(np.clip(resize(display, prepared.size)[0, 0].numpy(), 0.0, 1.0))
    return results
