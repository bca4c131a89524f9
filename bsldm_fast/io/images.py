"""Raster radiographs on disk: PNG (8/16-bit), JPEG (8-bit) and TIFF (8/16-bit integer, float).

Files only; tensors live elsewhere. Every reader raises `ImageError` (naming the file) for anything
it cannot read, never a third-party exception; sizes are checked from the header before pixels are
decoded, so a huge image is refused rather than exhausting memory. Outputs are written to a
temporary file beside the target and renamed (`_files.atomic_write`). The size limits, format
sniffing and `ImageError` live in formats.py, which the DICOM reader shares.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .._files import atomic_write
from .dicom import read_dicom
from .formats import (
    LIMIT_TEXT,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_SIDE,
    RASTER_SUFFIXES,
    SUFFIXES,
    ImageError,
    check_size,
    describe_path,
    is_image_path,
    is_regular,
    read_head,
    sniff,
)

logger = logging.getLogger(__name__)

# EXIF/TIFF orientation (1-8) -> the NumPy operation that turns the stored pixels upright, as PIL's
# ImageOps.exif_transpose does, and its inverse, which puts a result back as the input stored it.
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1, :],
    5: lambda a: a.T,
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].T,
    8: lambda a: np.rot90(a, 1),
}
_STORED = {**_UPRIGHT, 6: lambda a: np.rot90(a, 1), 8: lambda a: np.rot90(a, -1)}


def upright(array: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels -> as displayed, for an EXIF/TIFF orientation value (1 or unknown: unchanged)."""
    return np.ascontiguousarray(_UPRIGHT.get(orientation, lambda a: a)(array))


def stored(array: np.ndarray, orientation: int) -> np.ndarray:
    """Inverse of `upright`."""
    return np.ascontiguousarray(_STORED.get(orientation, lambda a: a)(array))


@dataclass(frozen=True)
class Raster:
    """A decoded raster file: pixels as stored, and what is needed to write a result the same way."""

    format: str
    pixels: np.ndarray
    orientation: int = 1
    exif: bytes | None = None
    dpi: tuple[float, float] | None = None
    icc_profile: bytes | None = None
    compression: str | None = None


_PIL_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _read_pil(path: Path, fmt: str, min_side: int = MIN_SIDE) -> Raster:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path, formats=[fmt])
        with image:
            width, height = image.size
            check_size(path, height, width, min_side)
            if getattr(image, "n_frames", 1) > 1:
                raise ImageError(f"{path}: holds {image.n_frames} frames; only single 2-D images "
                                 "are supported")
            image.load()
            mode = image.mode
            if mode in _PIL_16:
                array = np.asarray(image).astype(np.uint16)
            elif mode == "I":
                array = np.asarray(image)
                if array.min() < 0 or array.max() > 65535:
                    raise ImageError(f"{path}: 32-bit integer pixels outside the 16-bit range")
                array = array.astype(np.uint16)
            elif mode == "F":
                array = np.asarray(image).astype(np.float32)
            elif mode == "L":
                array = np.asarray(image).copy()
            else:
                warnings.warn(f"{path}: {mode} image converted to grey-scale (8-bit)", stacklevel=3)
                array = np.asarray(image.convert("L")).copy()
            exif = image.getexif()
            info = image.info
            return Raster(
                format=fmt,
                pixels=array,
                orientation=int(exif.get(0x0112, 1) or 1),
                exif=exif.tobytes() if len(exif) else None,
                dpi=info.get("dpi"),
                icc_profile=info.get("icc_profile"),
                compression=info.get("compression"),
            )
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: image is too large ({LIMIT_TEXT}; Pillow: {error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError,
            TypeError, KeyError, struct.error, ZeroDivisionError, MemoryError) as error:
        raise ImageError(f"{path}: cannot read {fmt} ({type(error).__name__}: {error})") from error


TIFF_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.uint32, np.int32,
                                           np.float16, np.float32, np.float64))

# Compressions tifffile can write without extra packages; anything else is rewritten as zlib.
_TIFF_WRITABLE = {"NONE": None, "ADOBE_DEFLATE": "zlib", "DEFLATE": "zlib", "LZMA": "lzma"}


def _read_tiff(path: Path, min_side: int = MIN_SIDE) -> Raster:
    import tifffile

    # tifffile logs every malformed tag; the ImageError below already says what went wrong.
    tiff_logger = logging.getLogger("tifffile")
    level = tiff_logger.level
    tiff_logger.setLevel(logging.CRITICAL)
    try:
        return _read_tiff_quietly(path, min_side, tifffile)
    finally:
        tiff_logger.setLevel(level)


def _read_tiff_quietly(path: Path, min_side: int, tifffile) -> Raster:
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.series) != 1 or len(tif.pages) != 1:
                raise ImageError(f"{path}: a TIFF with {len(tif.pages)} pages; only single 2-D "
                                 "images are supported")
            page = tif.pages[0]
            shape = tuple(int(s) for s in page.shape)
            samples = int(page.samplesperpixel)
            planar = len(shape) == 3 and samples in (3, 4) and shape[0] == samples
            if len(shape) == 3 and samples in (3, 4) and (shape[-1] == samples or planar):
                height, width = shape[1:] if planar else shape[:2]
            elif len(shape) == 2:
                height, width = shape
            else:
                raise ImageError(f"{path}: TIFF of shape {shape}; expected a 2-D grey-scale image")
            check_size(path, height, width, min_side)
            compression = page.compression.name
            orientation = int(getattr(page, "orientation", 1) or 1)
            try:
                array = page.asarray()
            except (ValueError, NotImplementedError) as error:
                if "imagecodecs" not in str(error):
                    raise
                # NOTE: tifffile decodes LZW/PackBits only with imagecodecs; Pillow has them built in.
                return _tiff_via_pil(path, orientation, compression, min_side)
    except ImageError:
        raise
    except Exception as error:  # tifffile raises many types on malformed files
        raise ImageError(f"{path}: cannot read TIFF ({type(error).__name__}: {error})") from error
    if array.ndim == 3:
        if planar:
            array = np.moveaxis(array, 0, -1)
        warnings.warn(f"{path}: colour TIFF converted to grey-scale", stacklevel=3)
        array = _to_grey(array[..., :3])
    if array.dtype.newbyteorder("=") not in TIFF_DTYPES:
        raise ImageError(f"{path}: TIFF pixels of type {array.dtype} are not supported (use "
                         "8/16-bit integers or float)")
    array = array.astype(array.dtype.newbyteorder("="), copy=False)
    return Raster("TIFF", np.ascontiguousarray(array), orientation, compression=compression)


def _tiff_via_pil(path: Path, orientation: int, compression: str, min_side: int) -> Raster:
    raster = _read_pil(path, "TIFF", min_side)
    return Raster("TIFF", raster.pixels, orientation, compression=compression)


def _to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (Pillow's 'L' conversion), keeping the input dtype."""
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    if np.issubdtype(rgb.dtype, np.integer):
        return np.rint(grey).astype(rgb.dtype)
    return grey.astype(rgb.dtype)


def read_raster(path: str | Path, fmt: str | None = None, min_side: int = MIN_SIDE) -> Raster:
    """A PNG, JPEG or TIFF file as stored (no orientation applied); ImageError for anything else."""
    path = Path(path)
    fmt = fmt or sniff(path)
    try:
        if fmt == "TIFF":
            return _read_tiff(path, min_side)
        if fmt in ("PNG", "JPEG"):
            return _read_pil(path, fmt, min_side)
    except PermissionError as error:
        raise ImageError(f"{path}: permission denied; cannot read it") from error
    raise ImageError(f"{path}: {fmt} is not a raster format")


def read_image(path: str | Path) -> np.ndarray:
    """The stored 2-D pixel array of a PNG/JPEG/TIFF (uint8, uint16 or float) or DICOM file.

    Colour images are converted to grey with a warning. The MIN_SIDE limit (a policy for
    suppression) does not apply here; the MAX_SIDE/MAX_PIXELS memory limits do.
    """
    path = Path(path)
    fmt = sniff(path)
    if fmt == "DICOM":
        return read_dicom(path, min_side=1).pixels
    return read_raster(path, fmt, min_side=1).pixels


def _save_pil(tmp: str, array: np.ndarray, fmt: str, like: Raster | None) -> None:
    image = Image.fromarray(array)
    options: dict = {"quality": 95} if fmt == "JPEG" else {}
    if like is not None:
        if like.exif:
            options["exif"] = like.exif
        if like.dpi:
            options["dpi"] = like.dpi
        if like.icc_profile:
            options["icc_profile"] = like.icc_profile
    image.save(tmp, format=fmt, **options)


def _save_tiff(tmp: str, array: np.ndarray, like: Raster | None) -> None:
    import tifffile

    compression = None
    extratags = []
    if like is not None:
        compression = _TIFF_WRITABLE.get(like.compression or "NONE", "zlib")
        if like.orientation != 1:
            extratags.append((274, "H", 1, like.orientation, True))
    tifffile.imwrite(tmp, array, photometric="minisblack", compression=compression,
                     extratags=extratags)


def output_format(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None or fmt == "DICOM":
        raise ImageError(f"{path}: unsupported output type {path.suffix!r} (supported: "
                         f"{sorted(RASTER_SUFFIXES)})")
    return fmt


def write_image(path: str | Path, array: np.ndarray, overwrite: bool = False,
                fmt: str | None = None, like: Raster | None = None) -> Path:
    """Write a 2-D array atomically: PNG/JPEG/TIFF by `fmt`, or by the suffix.

    PNG takes uint8/uint16, JPEG uint8, TIFF also float; `like` carries the input's EXIF,
    resolution, ICC profile and TIFF compression/orientation over to the output.
    """
    path = Path(path)
    fmt = fmt or output_format(path)
    allowed = {"PNG": (np.uint8, np.uint16), "JPEG": (np.uint8,),
               "TIFF": TIFF_DTYPES}[fmt]
    if array.ndim != 2 or array.dtype not in allowed:
        if fmt == "JPEG" and array.ndim == 2 and array.dtype == np.uint16:
            raise ImageError(f"{path}: JPEG holds 8 bits only; write 16-bit results as PNG or TIFF")
        raise ImageError(f"{path}: cannot write a {array.dtype} array of shape {array.shape} as "
                         f"{fmt}")
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: output exists; refusing to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "TIFF":
        atomic_write(path, lambda tmp: _save_tiff(tmp, array, like))
    else:
        atomic_write(path, lambda tmp: _save_pil(tmp, array, fmt, like))
    return path


@dataclass(frozen=True)
class Job:
    """One input image and where its result goes, relative to the output folder.

    An entry that looks like an input but cannot be one (a FIFO named x.png, a dangling link, a
    link loop) is a Job with `problem` set, so that it is reported rather than dropped; `fatal`
    says whether it counts as a failure (it has an image suffix or was named explicitly) or only
    as skipped (a suffix-less entry that could have been a DICOM file).
    """

    source: Path
    relative: Path
    problem: str | None = None
    fatal: bool = True


def _dicom_marker(path: Path) -> bool:
    """True for a regular file with the 'DICM' marker (callers have checked it is regular)."""
    try:
        return read_head(path, 132)[0][128:132] == b"DICM"
    except (OSError, ImageError):
        return False


def _entry(path: Path, relative: Path) -> Job | None:
    """The Job for one folder entry that is not a folder, or None when it is not an input.

    Hidden entries (.DS_Store, macOS '._x.png' forks, our own '.x.part' temporaries) and DICOMDIR
    are never inputs. Files are taken by suffix, suffix-less files by the DICOM marker; an entry
    that is not a regular file is never opened, only reported.
    """
    name = path.name
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return None
    suffix_less = not path.suffix
    if not (is_image_path(path) or suffix_less):
        return None
    if is_regular(path):
        if suffix_less:
            return Job(path, relative) if _dicom_marker(path) else None
        return Job(path, relative)
    what = describe_path(path)
    if suffix_less:
        return Job(path, relative, f"{what}; not opened (only regular files are read, and a "
                                   "suffix-less entry is taken only when it is a DICOM file)",
                   fatal=False)
    return Job(path, relative, f"{what}, not a regular file; not opened")


def find_images(inputs: list[str | Path], report_all: bool = False) -> list[Job]:
    """Image files among `inputs`; folders are searched recursively, keeping relative paths.

    In folders, files with an image suffix and suffix-less DICOM files (with the 'DICM' marker) are
    taken; hidden files and DICOMDIR are not. A file named explicitly is always taken. Only
    regular files are ever opened. With `report_all`, every entry that looks like an input but
    cannot be read as one (a FIFO, socket or device; a dangling link or a link loop; a link to a
    folder, which is not followed) is returned too, as a Job with `problem` set.
    """
    jobs: list[Job] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found: list[Job] = []
            for root, dirs, files in os.walk(item):
                here = Path(root)
                if report_all:
                    for name in dirs:
                        if not name.startswith(".") and os.path.islink(here / name):
                            found.append(Job(here / name, (here / name).relative_to(item),
                                             f"{describe_path(here / name)}; links to folders "
                                             "are not followed", fatal=False))
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in files:
                    job = _entry(here / name, (here / name).relative_to(item))
                    if job is not None and (report_all or job.problem is None):
                        found.append(job)
            found.sort(key=lambda job: job.source)
            jobs.extend(found)
        elif is_regular(item):
            jobs.append(Job(item, Path(item.name)))
        elif os.path.lexists(item):
            problem = f"{describe_path(item)}, not a regular file; not opened"
            if not report_all:
                raise ImageError(f"{item}: {problem}")
            jobs.append(Job(item, Path(item.name), problem))
        else:
            raise ImageError(f"{item}: no such file or folder")
    return jobs
