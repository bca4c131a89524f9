"""One radiograph file of any supported format <-> the model's display-space image.

`read_radiograph` gives `unit`: float32 in [0, 1], upright, dense = bright (MONOCHROME2), the input's
size. `write_radiograph` puts a result in that space back into the input's format, bit depth, size,
orientation and (for DICOM) pixel representation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .._files import atomic_write
from .dicom import DicomImage, Provenance, read_dicom, write_dicom
from .formats import ImageError, sniff
from .images import Raster, read_raster, stored, upright, write_image
from .intensity import pixels_to_unit, unit_to_pixels

OUTPUT_KINDS = ("soft", "bone")


@dataclass
class Radiograph:
    """A decoded input: its display-space image and what is needed to write results like it."""

    path: Path
    format: str
    unit: np.ndarray
    raster: Raster | None = None
    dicom: DicomImage | None = None
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.unit.shape


def read_radiograph(path: str | Path) -> Radiograph:
    """Read a PNG, JPEG, TIFF or DICOM radiograph; `ImageError` (naming the file) for anything else."""
    path = Path(path)
    fmt = sniff(path)
    if fmt == "DICOM":
        image = read_dicom(path)
        return Radiograph(path, fmt, image.unit, dicom=image)
    raster = read_raster(path, fmt)
    pixels = raster.pixels
    work = pixels if pixels.dtype in (np.uint8, np.uint16) or pixels.dtype.kind == "f" \
        else pixels.astype(np.float64)
    try:
        unit, value_range = pixels_to_unit(work)
    except (ValueError, TypeError) as error:
        raise ImageError(f"{path}: {error}") from error
    return Radiograph(path, fmt, upright(unit, raster.orientation), raster=raster,
                      value_range=value_range)


def bone_unit(cxr: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """The bone image, CXR minus soft tissue in display space, clipped at 0 (BS-LDM, Sec. I)."""
    return np.clip(cxr - soft, 0.0, 1.0).astype(np.float32)


def write_radiograph(path: str | Path, source: Radiograph, unit: np.ndarray, kind: str,
                     provenance: Provenance, overwrite: bool = False) -> Path:
    """Write a display-space result like `source`: same format, bit depth, size and orientation."""
    path = Path(path)
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; choose one of {OUTPUT_KINDS}")
    if unit.shape != source.shape:
        raise ImageError(f"{path}: result of shape {unit.shape} does not match the input "
                         f"{source.shape}")
    if source.dicom is not None:
        return write_dicom(path, source.dicom, unit, kind, provenance, overwrite)
    raster = source.raster
    values = unit_to_pixels(stored(unit, raster.orientation), source.value_range, raster.pixels.dtype)
    return write_image(path, values, overwrite=overwrite, fmt=source.format, like=raster)


REVIEW_HEIGHT = 1024
"""Height of each panel of the side-by-side review image (smaller inputs keep their size)."""


def write_review(path: str | Path, panels: list[np.ndarray], overwrite: bool = False) -> Path:
    """An 8-bit PNG of display-space images side by side (CXR | soft tissue [| bone]), for review."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: output exists; refusing to overwrite")
    height, width = panels[0].shape
    scale = min(1.0, REVIEW_HEIGHT / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    images = []
    for panel in panels:
        image = Image.fromarray(np.rint(np.clip(panel, 0, 1) * 255).astype(np.uint8))
        images.append(image if scale == 1.0 else image.resize(size, Image.Resampling.BILINEAR))
    gap = 4
    sheet = Image.new("L", (size[0] * len(images) + gap * (len(images) - 1), size[1]), 0)
    for i, image in enumerate(images):
        sheet.paste(image, (i * (size[0] + gap), 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path
