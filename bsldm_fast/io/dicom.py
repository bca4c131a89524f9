"""DICOM radiographs through pydicom: stored pixels <-> the model's display-space image, and results
written as new derived instances.

The display mapping follows DICOM PS3.3 C.11: stored value -> Modality LUT (Rescale Slope/Intercept
or a Modality LUT Sequence) -> VOI LUT (a VOI LUT Sequence, else the first Window Center/Width with
its VOI LUT Function, else the image's own min..max) -> [0, 1], inverted for MONOCHROME1 so that
dense is always bright. Because Bits Stored is at most 16, the whole mapping is one table over every
storable value; a result goes back through that table's inverse (the stored value whose display
value is nearest), so it keeps the input's pixel representation and displays under the input's
window exactly as the model's output.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._files import atomic_write
from .formats import MIN_SIDE, ImageError, check_size

logger = logging.getLogger(__name__)

_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for UIDs derived from a hash


@dataclass(frozen=True)
class Provenance:
    """Who made a result: written into derived DICOM instances and the batch report."""

    model: str
    sampler: str
    steps: int
    seed: int
    version: str
    untrained: bool = False
    name: str = ""
    """The model's name (its config's `name`); results are labelled with it, not with a path."""

    def label(self) -> str:
        return f"{self.model}, {self.sampler} {self.steps} steps, seed {self.seed}"

    def model_name(self) -> str:
        name = self.name or Path(self.model.rstrip("/")).name or self.model
        return f"untrained {name}" if self.untrained else name


@dataclass
class DicomImage:
    """A decoded DICOM radiograph: stored pixels, the header (pixel data removed), and its mapping."""

    pixels: np.ndarray
    dataset: object
    domain_low: int
    table: np.ndarray
    """table[v - domain_low]: display value in [0, 1] (dense = bright) of stored value v."""
    source_syntax: str

    @property
    def unit(self) -> np.ndarray:
        return self.table[self.pixels.astype(np.int64) - self.domain_low]

    def to_stored(self, unit: np.ndarray) -> np.ndarray:
        """Stored values whose display value is nearest to `unit` (ties: the value nearest the
        middle of the display range, so clipped areas land on the window's edge)."""
        domain = np.arange(self.domain_low, self.domain_low + len(self.table))
        centre = domain[np.argmin(np.abs(self.table - 0.5))]
        order = np.lexsort((np.abs(domain - centre), self.table))
        values = self.table[order]
        first = np.r_[True, values[1:] != values[:-1]]
        levels, representatives = values[first], domain[order][first]
        u = np.clip(np.nan_to_num(unit, nan=0.0), 0.0, 1.0)
        if len(levels) == 1:
            return np.full(u.shape, representatives[0], self.pixels.dtype)
        index = np.clip(np.searchsorted(levels, u), 1, len(levels) - 1)
        index -= (u - levels[index - 1]) <= (levels[index] - u)
        return representatives[index].astype(self.pixels.dtype)


def _decoders():
    import pydicom.uid as uid
    from pydicom.pixels import get_decoder

    names = ["ImplicitVRLittleEndian", "ExplicitVRLittleEndian", "DeflatedExplicitVRLittleEndian",
             "ExplicitVRBigEndian", "RLELossless", "JPEGBaseline8Bit", "JPEGExtended12Bit",
             "JPEGLossless", "JPEGLosslessSV1", "JPEGLSLossless", "JPEGLSNearLossless",
             "JPEG2000Lossless", "JPEG2000", "HTJ2KLossless", "HTJ2KLosslessRPCL", "HTJ2K"]
    for name in names:
        syntax = getattr(uid, name, None)
        if syntax is not None:
            yield syntax, get_decoder(syntax)


def transfer_syntaxes() -> list[dict]:
    """Every transfer syntax pydicom knows a decoder for, whether one is installed here, and what
    to install when not."""
    rows = []
    for syntax, decoder in _decoders():
        rows.append({
            "name": syntax.name, "uid": str(syntax), "supported": bool(decoder.is_available),
            "plugins": list(decoder.available_plugins) or (["pydicom"] if not syntax.is_compressed
                                                           else []),
            "missing": [] if decoder.is_available else list(decoder.missing_dependencies),
        })
    return rows


def support_table() -> str:
    """`transfer_syntaxes()` as a plain-text table."""
    lines = []
    for row in transfer_syntaxes():
        how = ("yes (" + ", ".join(row["plugins"]) + ")" if row["supported"]
               else "no; install one of: " + "; ".join(row["missing"]))
        if row["name"].startswith("JPEG Extended") and row["plugins"] == ["pillow"]:
            how += "; 8-bit only: 12-bit needs pylibjpeg-libjpeg or gdcm"
        lines.append(f"{row['name']:<48} {how}")
    return "\n".join(lines)


def _check_header(path: Path, ds, min_side: int) -> None:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise ImageError(f"{path}: DICOM with float pixel data is not supported")
        sop = getattr(ds.get("SOPClassUID"), "name", ds.get("SOPClassUID", "unknown"))
        raise ImageError(f"{path}: DICOM without pixel data ({sop}); nothing to suppress")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames if frames not in (None, "") else 1)
    except (TypeError, ValueError):
        raise ImageError(f"{path}: invalid Number of Frames {frames!r}") from None
    if frames < 1:
        raise ImageError(f"{path}: invalid Number of Frames {frames}")
    if frames != 1:
        raise ImageError(f"{path}: multi-frame DICOM ({frames} frames); only single 2-D images are "
                         "supported")
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(f"{path}: DICOM photometric interpretation {photometric or 'missing'!r} "
                         f"with {samples} samples per pixel; only grey-scale MONOCHROME1/2 "
                         "radiographs are supported")
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"):
        if ds.get(keyword) is None:
            raise ImageError(f"{path}: DICOM image without the required {keyword}")
    allocated, bits, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
    if allocated not in (8, 16) or not 1 <= bits <= allocated or signed not in (0, 1):
        raise ImageError(f"{path}: unsupported pixel layout (Bits Allocated {allocated}, Bits Stored "
                         f"{bits}, Pixel Representation {signed}); 8- or 16-bit integers only")
    check_size(path, int(ds.Rows), int(ds.Columns), min_side)


def _check_decoder(path: Path, ds) -> str:
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        return "unknown"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(f"{path}: transfer syntax {syntax} ({getattr(syntax, 'name', '?')}) has no "
                         "pixel data decoder in pydicom") from None
    if not decoder.is_available:
        raise ImageError(f"{path}: cannot decode {syntax.name} pixel data: no decoder installed; "
                         "install one of: " + "; ".join(decoder.missing_dependencies))
    return str(syntax)


def _modality(values: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(values, ds), dtype=np.float64)


def _window(values: np.ndarray, ds, path: Path) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2 windowing to [0, 1] with the first Window Center/Width; None without one."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None or centre == "" or width == "":
        return None
    try:
        centre = float(centre[0] if _is_multi(centre) else centre)
        width = float(width[0] if _is_multi(width) else width)
    except (TypeError, ValueError, IndexError):
        warnings.warn(f"{path}: unreadable Window Center/Width; using the image's range", stacklevel=4)
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if not np.isfinite([centre, width]).all() or width <= 0 or (function == "LINEAR" and width < 1):
        warnings.warn(f"{path}: invalid window (centre {centre}, width {width}); using the image's "
                      "range", stacklevel=4)
        return None
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(np.clip(-4.0 * (values - centre) / width, -700, 700)))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    return np.clip((values - (centre - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _is_multi(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def _voi_lut(values: np.ndarray, ds) -> np.ndarray | None:
    from pydicom.pixels import apply_voi

    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    # A LUT is indexed by integers: round the modality output (clamped: the LUT clamps anyway).
    index = np.rint(np.clip(np.nan_to_num(values), -(2**31), 2**31)).astype(np.int64)
    mapped = np.asarray(apply_voi(index, ds, index=0), dtype=np.float64)
    low, high = mapped.min(), mapped.max()
    return (mapped - low) / (high - low) if high > low else np.zeros_like(mapped)


def read_dicom(path: str | Path, min_side: int = MIN_SIDE) -> DicomImage:
    """A single-frame grey-scale DICOM image, with its display mapping; ImageError for anything else."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every non-conformant value
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                ds = pydicom.dcmread(path, force=True)  # no preamble: old ACR-NEMA-style files
                if "PixelData" not in ds and "SOPClassUID" not in ds:
                    raise ImageError(f"{path}: not a DICOM file (no 'DICM' marker, and no DICOM "
                                     "image header could be parsed)") from None
    except PermissionError as error:
        raise ImageError(f"{path}: permission denied; cannot read it") from error
    except ImageError:
        raise
    except Exception as error:  # pydicom raises many types on malformed files
        raise ImageError(f"{path}: not a readable DICOM file ({type(error).__name__}: {error})") \
            from error
    try:
        _check_header(path, ds, min_side)
        syntax = _check_decoder(path, ds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
        if pixels.shape != (int(ds.Rows), int(ds.Columns)):
            raise ImageError(f"{path}: decoded pixels of shape {pixels.shape} do not match Rows x "
                             f"Columns {int(ds.Rows)}x{int(ds.Columns)}")
        pixels = pixels.astype(pixels.dtype.newbyteorder("="), copy=False)
        bits, signed = int(ds.BitsStored), int(ds.PixelRepresentation)
        low = -(2 ** (bits - 1)) if signed else 0
        domain = np.arange(low, low + 2**bits, dtype=np.int64)
        values = _modality(domain, ds)
        display = _voi_lut(values, ds)
        if display is None:
            display = _window(values, ds, path)
        if display is None:
            used = values[pixels.astype(np.int64) - low]
            vmin, vmax = float(used.min()), float(used.max())
            display = np.clip((values - vmin) / (vmax - vmin), 0, 1) if vmax > vmin else \
                np.zeros_like(values)
        if not np.isfinite(display).all():
            raise ImageError(f"{path}: the Modality/VOI LUT gives non-finite values")
        if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
            display = 1.0 - display
    except ImageError:
        raise
    except Exception as error:  # decoders and LUT helpers raise many types on malformed data
        raise ImageError(f"{path}: cannot decode DICOM pixel data ({type(error).__name__}: "
                         f"{error})") from error
    del ds.PixelData  # keep the header only; results get their own pixel data
    return DicomImage(np.ascontiguousarray(pixels), ds, low, display.astype(np.float32), syntax)


def _uid(*parts: str) -> str:
    """A UID derived from `parts`, so a rerun gives the same UIDs for the same inputs and settings."""
    digest = int(hashlib.sha256("\x00".join(parts).encode()).hexdigest(), 16)
    return (_UID_ROOT + str(digest))[:64].rstrip(".")


KIND_DESCRIPTIONS = {"soft": "Bone-suppressed", "bone": "Bone image (CXR minus soft tissue)"}
_SERIES_KINDS = {"soft": "Bone-suppressed", "bone": "Bone image"}
SERIES_DESCRIPTION_MAX = 64
"""Series Description is LO: at most 64 characters, no backslash or control characters."""


def _ascii(text: str, keep_backslash: bool = False) -> str:
    """`text` in the DICOM default character repertoire (the output keeps the input's Specific
    Character Set, which may not cover what a model name or path holds)."""
    return "".join(c if " " <= c <= "~" and (keep_backslash or c != "\\") else "?" for c in text)


def series_description(kind: str, provenance: Provenance) -> str:
    """'Bone-suppressed (bsldm_fast, NAME)' within LO's 64 characters: the model's name, shortened
    with '...' when it is too long, never cut in the middle of a path."""
    head, tail = f"{_SERIES_KINDS[kind]} (bsldm_fast, ", ")"
    name = _ascii(provenance.model_name())
    room = SERIES_DESCRIPTION_MAX - len(head) - len(tail)
    if len(name) > room:
        name = name[: room - 3] + "..."
    return head + name + tail


def derived_dataset(image: DicomImage, stored_pixels: np.ndarray, kind: str,
                    provenance: Provenance):
    """The header of `image` as a new derived instance holding `stored_pixels`.

    Changed: SOP Instance UID (and the file meta's copy), Series Instance UID, Image Type
    (DERIVED\\SECONDARY), Series Description, Derivation Description, a Source Image Sequence
    pointing at the input, the pixel data, and the transfer syntax when the input's cannot be
    written (see `_output_syntax`). Everything else, Study and Patient included, is kept.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence

    ds = copy.deepcopy(image.dataset)
    settings = f"{provenance.version}|{provenance.label()}|{kind}"
    original_series = str(ds.get("SeriesInstanceUID", "")) or _uid("no-series", str(id(ds)))
    original_sop = str(ds.get("SOPInstanceUID", ""))
    sop = _uid("instance", original_sop or original_series, settings)
    ds.SeriesInstanceUID = _uid("series", original_series, settings)
    ds.SOPInstanceUID = sop
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = series_description(kind, provenance)
    ds.DerivationDescription = _ascii(
        f"{KIND_DESCRIPTIONS[kind]} by bsldm_fast {provenance.version}: BS-LDM bone suppression "
        f"(Sun et al., IEEE JBHI 2025), model {provenance.label()}."
        + (" Untrained random model: not a bone-suppressed image." if provenance.untrained else "")
        + " Not for clinical use.", keep_backslash=True
    )[:1024]
    if original_sop and "SOPClassUID" in ds:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = original_sop
        ds.SourceImageSequence = Sequence([item])
    if "SmallestImagePixelValue" in ds:
        ds.SmallestImagePixelValue = int(stored_pixels.min())
    if "LargestImagePixelValue" in ds:
        ds.LargestImagePixelValue = int(stored_pixels.max())
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    ds.file_meta = meta
    syntax = _output_syntax(image.source_syntax)
    meta.TransferSyntaxUID = syntax
    meta.MediaStorageSOPInstanceUID = sop
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    little = stored_pixels.astype(stored_pixels.dtype.newbyteorder("<"), copy=False)
    data = little.tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
    ds["PixelData"].is_undefined_length = False
    if syntax == _RLE:
        ds.compress(_RLE, stored_pixels, generate_instance_uid=False)
    return ds


_RLE = "1.2.840.10008.1.2.5"
_KEEP = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


def _output_syntax(source: str) -> str:
    """The input's transfer syntax when it is native little endian or RLE (lossless, encoded by
    pydicom itself); else Explicit VR Little Endian, so no result is compressed lossily again."""
    import pydicom.uid as uid

    if source in _KEEP or source == _RLE:
        return uid.UID(source)
    return uid.ExplicitVRLittleEndian


def write_dicom(path: str | Path, image: DicomImage, unit: np.ndarray, kind: str,
                provenance: Provenance, overwrite: bool = False) -> Path:
    """Write `unit` (display space, the input's size) as a derived instance of `image`, atomically."""
    import pydicom

    path = Path(path)
    if unit.shape != image.pixels.shape:
        raise ImageError(f"{path}: result of shape {unit.shape} does not match the input "
                         f"{image.pixels.shape}")
    if path.exists() and not overwrite:
        raise ImageError(f"{path}: output exists; refusing to overwrite")
    ds = derived_dataset(image, image.to_stored(unit), kind, provenance)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))
    return path
