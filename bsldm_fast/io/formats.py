"""What a radiograph file is, found without decoding it: its format (sniffed from its content), the
size limits every reader enforces, and `ImageError`, the one error every reader raises.

A leaf of io/: it imports nothing from the package, so the raster (images.py) and DICOM (dicom.py)
readers can both build on it without importing each other.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from pathlib import Path

RASTER_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
DICOM_SUFFIXES = {".dcm": "DICOM", ".dicom": "DICOM"}
SUFFIXES = {**RASTER_SUFFIXES, **DICOM_SUFFIXES}

MIN_SIDE = 32
"""Smallest accepted image side in pixels: below it there is no anatomy left to suppress."""
MAX_SIDE = 16384
"""Largest accepted image side in pixels."""
MAX_PIXELS = 8192 * 8192
"""Largest accepted pixel count (8192², 67.1 Mpx; the largest chest detectors give ~19 Mpx)."""
LIMIT_TEXT = f"limit: {MAX_SIDE} px a side and {MAX_PIXELS / 1e6:.1f} Mpx in all"
MAX_FILE_BYTES = 2 * 1024**3
"""Largest accepted file: bigger files are refused before anything is read."""

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
)


class ImageError(ValueError):
    """A file that cannot be read or written as a radiograph; the message names the file and why."""


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


def check_size(path: Path, height: int, width: int, min_side: int = MIN_SIDE) -> None:
    """Refuse images outside [min_side, MAX_SIDE] per side or above MAX_PIXELS, before decoding."""
    if min(height, width) < min_side:
        raise ImageError(f"{path}: image of {width}x{height} px is too small "
                         f"(each side must be at least {min_side} px)")
    if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise ImageError(f"{path}: image of {width}x{height} px is too large ({LIMIT_TEXT})")


def describe_path(path: str | Path) -> str:
    """What a path that is not a regular file is, in words, found without opening it: 'missing',
    'a FIFO (named pipe)', 'a broken symbolic link to X', 'a symbolic link to /dev/zero (a
    character device)', 'a symbolic link loop', 'a folder', ..."""
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"not accessible ({error.strerror or error})"
    prefix = ""
    if stat.S_ISLNK(link.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            if error.errno == errno.ELOOP:
                return "a symbolic link loop"
            if error.errno == errno.ENOENT:
                return f"a broken symbolic link to {target}"
            return f"a symbolic link to {target} that cannot be followed ({error.strerror})"
        prefix = f"a symbolic link to {target} ("
    else:
        mode = link.st_mode
    kinds = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))
    kind = next((text for test, text in kinds if test(mode)), "not a regular file")
    return prefix + kind + (")" if prefix else "")


def is_regular(path: Path) -> bool:
    """True for a regular file (links followed); never opens it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_head(path: Path, count: int) -> tuple[bytes, int]:
    """The first `count` bytes and the size of a regular file, which is checked to be one before
    it is opened: opening a FIFO blocks forever and opening a device can have effects."""
    try:
        before = os.stat(path)
    except OSError as error:
        raise ImageError(f"{path}: {describe_path(path)}; cannot read it") from error
    if stat.S_ISDIR(before.st_mode):
        raise ImageError(f"{path}: is a folder, not an image file")
    if not stat.S_ISREG(before.st_mode):
        raise ImageError(f"{path}: {describe_path(path)}, not a regular file; not opened")
    with open(path, "rb", opener=_nonblocking) as handle:
        after = os.fstat(handle.fileno())
        if not stat.S_ISREG(after.st_mode):
            raise ImageError(f"{path}: changed into something other than a regular file; not read")
        return handle.read(count), after.st_size


def _nonblocking(path: str, flags: int) -> int:
    # Should the path turn into a FIFO between stat and open, open must not block.
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))


def sniff(path: str | Path) -> str:
    """The file's format from its content: 'PNG', 'JPEG', 'TIFF' or 'DICOM'; ImageError otherwise.

    Only regular files are opened. A format that disagrees with the suffix is read by content,
    with a warning.
    """
    path = Path(path)
    try:
        head, size = read_head(path, 132)
    except PermissionError as error:
        raise ImageError(f"{path}: permission denied; cannot read it ({error.strerror})") from error
    except OSError as error:
        raise ImageError(f"{path}: cannot open ({error.strerror or error})") from error
    if size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: file of {size / 1024**3:.1f} GiB is larger than the "
                         f"{MAX_FILE_BYTES / 1024**3:.0f} GiB limit")
    # DICM first: a DICOM preamble may itself be a TIFF header (PS3.10 7.5, dual-personality files).
    found = "DICOM" if head[128:132] == b"DICM" else \
        next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    expected = SUFFIXES.get(path.suffix.lower())
    if found is None:
        if expected == "DICOM":
            return "DICOM"  # a DICOM file without the 128-byte preamble; pydicom may still read it
        kind = "text" if _looks_like_text(head) else f"data starting {head[:8]!r}"
        raise ImageError(f"{path}: not a PNG, JPEG, TIFF or DICOM file (it holds {kind})")
    if expected is not None and expected != found:
        warnings.warn(f"{path}: named {path.suffix} but holds {found}; reading it as {found} "
                      f"(its output keeps the name and the {found} format)", stacklevel=2)
    return found


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
