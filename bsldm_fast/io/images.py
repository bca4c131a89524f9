"""Reading and writing grey-scale radiographs: PNG (8/16-bit) and JPEG (8-bit).

Files only; tensors and intensity mapping live elsewhere. Outputs are written to a temporary file in
the target folder and renamed, so a crash never leaves a half-written image.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .._files import atomic_write

logger = logging.getLogger(__name__)

SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


class ImageError(ValueError):
    """A file that cannot be read or written as a radiograph; the message names the file."""


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """A 2-D uint8 or uint16 array. Colour images are converted to grey with a warning."""
    path = Path(path)
    if not is_image_path(path):
        raise ImageError(f"{path}: unsupported file type {path.suffix!r} (supported: {sorted(SUFFIXES)})")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
                array = np.asarray(image).astype(np.uint16)
            elif mode == "I":
                array = np.asarray(image)
                if array.min() < 0 or array.max() > 65535:
                    raise ImageError(f"{path}: 32-bit integer pixels outside the 16-bit range")
                array = array.astype(np.uint16)
            elif mode == "L":
                array = np.asarray(image).copy()
            else:
                warnings.warn(f"{path}: {mode} image converted to grey-scale", stacklevel=2)
                array = np.asarray(image.convert("L")).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{path}: cannot read image ({error})") from error
    if array.ndim != 2:
        raise ImageError(f"{path}: expected a 2-D grey-scale image, got shape {array.shape}")
    return array


def write_image(path: str | Path, array: np.ndarray, overwrite: bool = False) -> Path:
    """Write a 2-D uint8/uint16 array in the format of the suffix, atomically."""
    path = Path(path)
    if not is_image_path(path):
        raise ImageError(f"{path}: unsupported output type {path.suffix!r}")
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{path}: can only write 2-D uint8/uint16 images, got {array.dtype} {array.shape}")
    fmt = SUFFIXES[path.suffix.lower()]
    if fmt == "JPEG" and array.dtype != np.uint8:
        raise ImageError(f"{path}: JPEG holds 8 bits only; write 16-bit results as PNG")
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: output exists; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    options = {"quality": 95} if fmt == "JPEG" else {}
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options))
    return path


@dataclass(frozen=True)
class Job:
    """One input image and where its result goes, relative to the output folder."""

    source: Path
    relative: Path


def find_images(inputs: list[str | Path]) -> list[Job]:
    """Image files among `inputs`; folders are searched recursively, keeping relative paths."""
    jobs: list[Job] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and is_image_path(p))
            jobs.extend(Job(p, p.relative_to(item)) for p in found)
        elif item.is_file():
            jobs.append(Job(item, Path(item.name)))
        else:
            raise ImageError(f"{item}: no such file or folder")
    return jobs
