"""Property tests: whatever bytes or headers a file holds, the readers either return a valid image or
raise ImageError, never another exception, a hang or unbounded memory.

The seeds are synthetic files and real ones (a SZCH-X-Rays radiograph as shipped, and as TIFF and
DICOM). `bash scripts/fuzz.sh` runs the same properties (and the model-directory loader's, in
tests/test_modeldir.py) with thousands of examples.
"""

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from dicom_factory import make_dicom
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from bsldm_fast.io import ImageError, read_image, read_radiograph

SUFFIXES = ["", ".png", ".jpg", ".tif", ".dcm", ".bin"]
# BSLDM_FUZZ_EXAMPLES=5000 for a deeper hunt; 60 keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("BSLDM_FUZZ_EXAMPLES", 60)), deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _check(path: Path) -> None:
    """The readers' contract: a valid display-space image, or ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_radiograph(path)
        except ImageError:
            pass
        else:
            assert image.unit.ndim == 2 and image.unit.dtype == np.float32
            assert np.isfinite(image.unit).all()
            assert image.unit.min() >= 0.0 and image.unit.max() <= 1.0
        try:
            read_image(path)
        except ImageError:
            pass


def _valid_files() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    out = {}
    for name, array in (("a.png", rng.integers(0, 256, (40, 40), dtype=np.uint8)),
                        ("b.png", rng.integers(0, 65536, (40, 40), dtype=np.uint16)),
                        ("c.jpg", rng.integers(0, 256, (40, 40), dtype=np.uint8))):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG" if name.endswith("jpg") else "PNG")
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rng.random((40, 40)).astype(np.float32), compression="zlib")
    out["d.tif"] = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        path = make_dicom(Path(folder) / "e.dcm", rng.integers(0, 4096, (40, 40), dtype=np.uint16),
                          bits_stored=12, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=1000,
                          WindowWidth=2000)
        out["e.dcm"] = path.read_bytes()
    return out


VALID = _valid_files()


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes(data, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{suffix}"
        path.write_bytes(data)
        _check(path)


@FUZZ
@given(name=st.sampled_from(sorted(VALID)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_corrupted_valid_files(name, cut, flips):
    data = bytearray(VALID[name])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = data[: max(1, int(cut * len(data)) if cut < 0.95 else len(data))]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(bytes(data))
        _check(path)


def _mostly(valid, *invalid):
    """Valid values four times in five, so that most examples get past the first check."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(valid),
                     st.sampled_from(valid), st.sampled_from(invalid))


header_values = st.fixed_dictionaries({
    "Rows": _mostly([32, 33, 40], 0, 1, 31, 70),
    "Columns": _mostly([32, 35, 40], 0, 2, 70),
    "BitsAllocated": _mostly([8, 16], 1, 12, 32),
    "BitsStored": _mostly([8, 10, 12, 16], 0, 1, 17, 33),
    "PixelRepresentation": _mostly([0, 1], 2),
    "SamplesPerPixel": _mostly([1], 0, 3, 4),
    "PhotometricInterpretation": _mostly(["MONOCHROME1", "MONOCHROME2"], "RGB", "", "X"),
    "NumberOfFrames": _mostly([None, 1], 0, 2),
    "RescaleSlope": st.sampled_from([None, "0", "1", "-2.5", "1e30", "nan", "inf"]),
    "RescaleIntercept": st.sampled_from([None, "0", "-1024", "1e308"]),
    "WindowCenter": st.sampled_from([None, "40", "2000", "-1e9", "nan", "1\\2"]),
    "WindowWidth": st.sampled_from([None, "400", "4000", "0", "-5", "0.5", "inf"]),
    "VOILUTFunction": st.sampled_from([None, "LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS"]),
    "pixel_bytes": _mostly([32 * 32 * 2, 33 * 35 * 2, 40 * 40 * 2, 32 * 32, 40 * 40],
                           0, 7, 70 * 70 * 2 + 8),
})


@FUZZ
@given(header=header_values)
def test_random_dicom_headers(header):
    header = dict(header)
    size = header.pop("pixel_bytes")
    tags = {k: v for k, v in header.items() if v is not None}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "h.dcm"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                make_dicom(path, np.zeros((2, 2), np.uint16), **tags)
                ds = pydicom.dcmread(path)
                ds.PixelData = bytes(np.random.default_rng(size).integers(0, 256, size + size % 2,
                                                                          dtype=np.uint8))
                ds.save_as(path)
        except Exception:  # noqa: BLE001  a header pydicom itself refuses to write is not a case
            assume(False)
        _check(path)


@pytest.mark.parametrize("name", sorted(VALID))
def test_the_valid_seeds_are_valid(tmp_path, name):
    (tmp_path / name).write_bytes(VALID[name])
    assert read_radiograph(tmp_path / name).unit.shape == (40, 40)


SZCH = Path(__file__).resolve().parents[2] / "assets" / "szch_samples" / "cxr" / "0.png"


def _real_files() -> dict[str, bytes]:
    """A real radiograph as shipped (PNG), and a crop of it as 16-bit TIFF and 12-bit DICOM (native
    and RLE): the structures real files have, for the mutations to break."""
    from pydicom.uid import RLELossless

    cxr = np.asarray(Image.open(SZCH))
    crop = cxr[384:640, 384:640].astype(np.uint16)
    out = {"szch.png": SZCH.read_bytes()}
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, crop * 257, compression="zlib")
    out["szch.tif"] = buffer.getvalue()
    with tempfile.TemporaryDirectory() as folder:
        path = make_dicom(Path(folder) / "szch.dcm", crop * 16, bits_stored=12, WindowCenter=2048,
                          WindowWidth=4096)
        out["szch.dcm"] = path.read_bytes()
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
        out["szch-rle.dcm"] = path.read_bytes()
    return out


REAL = _real_files()


@FUZZ
@given(name=st.sampled_from(sorted(REAL)), data=st.data())
def test_mutated_real_files(name, data):
    """Byte changes where the structure is (the first kilobyte: signatures, headers, tags) and
    anywhere, chunks deleted or repeated, and truncation."""
    blob = bytearray(REAL[name])
    for _ in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["head", "anywhere", "delete", "repeat", "truncate"]))
        at = data.draw(st.integers(0, min(1023, len(blob) - 1) if kind == "head"
                                   else len(blob) - 1))
        if kind in ("head", "anywhere"):
            blob[at] = data.draw(st.integers(0, 255))
        elif kind == "delete":
            del blob[at:at + data.draw(st.integers(1, 64))]
        elif kind == "repeat":
            blob[at:at] = blob[at:at + data.draw(st.integers(1, 64))]
        else:
            del blob[max(at, 1):]
        if not blob:
            blob = bytearray(b"\0")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(bytes(blob))
        _check(path)


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_real_seeds_are_valid(tmp_path, name):
    (tmp_path / name).write_bytes(REAL[name])
    assert read_radiograph(tmp_path / name).unit.shape == ((1024, 1024) if name.endswith("png")
                                                           else (256, 256))
