"""Every kind of bad input gets a clear ImageError naming the file, never a crash or a lost file."""

import errno
import io
import os
import struct
import zlib

import numpy as np
import pytest
import tifffile
from dicom_factory import make_dicom
from PIL import Image

from bsldm_fast.io import MAX_PIXELS, MIN_SIDE, ImageError, Provenance, read_radiograph, write_image
from bsldm_fast.io import formats as formats_module
from bsldm_fast.io import images as images_module
from bsldm_fast.io.radiograph import write_radiograph

PROV = Provenance(model="m", sampler="ddim", steps=3, seed=0, version="0")


def _png_bytes(shape=(40, 40), dtype=np.uint8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng().integers(0, 200, shape).astype(dtype)).save(buffer, "PNG")
    return buffer.getvalue()


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with its header claiming another size (and a valid header CRC)."""
    ihdr = bytearray(png[8 + 8 : 8 + 8 + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return png[:16] + bytes(ihdr) + crc + png[16 + 13 + 4 :]


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: empty file \(0 bytes\)"):
        read_radiograph(tmp_path / "empty.png")


def test_truncated_png(tmp_path):
    data = _png_bytes((64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: cannot read PNG"):
        read_radiograph(tmp_path / "cut.png")


def test_wrong_extension_is_read_by_content_and_written_like_it(tmp_path):
    (tmp_path / "scan.jpg").write_bytes(_png_bytes((40, 48), np.uint8))
    with pytest.warns(UserWarning, match="named .jpg but holds PNG"):
        source = read_radiograph(tmp_path / "scan.jpg")
    write_radiograph(tmp_path / "out.jpg", source, source.unit, "soft", PROV)
    with Image.open(tmp_path / "out.jpg") as out:
        assert out.format == "PNG"


def test_non_image_files(tmp_path):
    (tmp_path / "notes.png").write_text("patient list, not an image\n")
    (tmp_path / "doc.dcm").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    (tmp_path / "x.bmp").write_bytes(b"BM" + bytes(100))
    with pytest.raises(ImageError, match="notes.png: not a PNG, JPEG, TIFF or DICOM file .*text"):
        read_radiograph(tmp_path / "notes.png")
    with pytest.raises(ImageError, match="doc.dcm: not a DICOM file"):
        read_radiograph(tmp_path / "doc.dcm")
    with pytest.raises(ImageError, match="x.bmp: not a PNG, JPEG, TIFF or DICOM"):
        read_radiograph(tmp_path / "x.bmp")
    with pytest.raises(ImageError, match="is a folder"):
        read_radiograph(tmp_path)


def test_dicom_without_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "sr.dcm", np.zeros((32, 32), np.uint16), pixel_data=False)
    with pytest.raises(ImageError, match="sr.dcm: DICOM without pixel data"):
        read_radiograph(path)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_png_is_converted_with_a_warning(tmp_path, mode):
    rgb = np.random.default_rng().integers(0, 256, (36, 40, 3), dtype=np.uint8)
    image = Image.fromarray(rgb).convert(mode)
    image.save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=f"{mode} image converted to grey"):
        source = read_radiograph(tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as opened:
        expected = np.asarray(opened.convert("L")) / 255.0
    np.testing.assert_allclose(source.unit, expected, atol=1e-6)


@pytest.mark.parametrize("planar", ["contig", "separate"])
def test_colour_tiff_is_converted_with_a_warning(tmp_path, planar):
    rgb = np.random.default_rng().integers(0, 65536, (36, 40, 3), dtype=np.uint16)
    stored = rgb if planar == "contig" else np.moveaxis(rgb, -1, 0)
    tifffile.imwrite(tmp_path / "c.tif", stored, photometric="rgb", planarconfig=planar)
    with pytest.warns(UserWarning, match="colour TIFF converted"):
        source = read_radiograph(tmp_path / "c.tif")
    grey = np.rint(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114) / 65535
    np.testing.assert_allclose(source.unit, grey, atol=1e-6)


def test_tiny_images_are_refused(tmp_path):
    write_image(tmp_path / "tiny.png", np.zeros((MIN_SIDE - 1, 200), np.uint8))
    with pytest.raises(ImageError, match=f"tiny.png: image of 200x{MIN_SIDE - 1} px is too small"):
        read_radiograph(tmp_path / "tiny.png")
    make_dicom(tmp_path / "tiny.dcm", np.zeros((8, 8), np.uint16))
    with pytest.raises(ImageError, match="too small"):
        read_radiograph(tmp_path / "tiny.dcm")


def test_huge_images_are_refused_before_decoding(tmp_path):
    # The headers claim 100000 x 100000 px (20 GB as 16-bit); the files are a few hundred bytes.
    (tmp_path / "huge.png").write_bytes(_with_ihdr_size(_png_bytes(), 100_000, 100_000))
    with pytest.raises(ImageError, match="huge.png: image .*too large"):
        read_radiograph(tmp_path / "huge.png")
    side = int(np.sqrt(MAX_PIXELS)) + 1  # under the per-side limit, over the pixel-count limit
    (tmp_path / "wide.png").write_bytes(_with_ihdr_size(_png_bytes(), side, side))
    with pytest.raises(ImageError, match="too large"):
        read_radiograph(tmp_path / "wide.png")
    make_dicom(tmp_path / "huge.dcm", np.zeros((32, 32), np.uint16), Rows=60000, Columns=60000)
    with pytest.raises(ImageError, match="huge.dcm: image of 60000x60000 px is too large"):
        read_radiograph(tmp_path / "huge.dcm")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_float_tiff(tmp_path, bad):
    image = np.random.default_rng().random((40, 40)).astype(np.float32)
    image[3, 5] = bad
    tifffile.imwrite(tmp_path / "f.tif", image)
    with pytest.raises(ImageError,
                       match=r"f.tif: image contains NaN or infinite values \(1 of 1600 pixels\)"):
        read_radiograph(tmp_path / "f.tif")


def test_unreadable_permissions(tmp_path):
    path = write_image(tmp_path / "locked.png", np.zeros((40, 40), np.uint8))
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod cannot deny reading; "
                        "test_permission_denied_is_reported covers the error path")
        with pytest.raises(ImageError, match="locked.png: permission denied"):
            read_radiograph(path)
    finally:
        os.chmod(path, 0o644)


def test_permission_denied_is_reported(tmp_path, monkeypatch):
    path = write_image(tmp_path / "locked.png", np.zeros((40, 40), np.uint8))

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(formats_module, "open", denied, raising=False)
    with pytest.raises(ImageError, match="locked.png: permission denied"):
        read_radiograph(path)


def test_multi_page_tiff_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((3, 40, 40), np.uint16), photometric="minisblack")
    with pytest.raises(ImageError, match="stack.tif: a TIFF with 3 pages; only single 2-D images"):
        read_radiograph(tmp_path / "stack.tif")
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros((2, 3, 40, 40), np.uint16),
                     photometric="minisblack", metadata=None)
    with pytest.raises(ImageError, match="volume.tif: .*2-D"):
        read_radiograph(tmp_path / "volume.tif")
    for _ in range(2):
        tifffile.imwrite(tmp_path / "pages.tif", np.zeros((40, 40), np.uint16), append=True)
    with pytest.raises(ImageError, match="pages.tif: a TIFF with 2 pages; only single 2-D images"):
        read_radiograph(tmp_path / "pages.tif")


def _disk_full_after_some_bytes(real):
    def write(tmp, *args, **kwargs):
        with open(tmp, "wb") as handle:
            handle.write(b"partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("fmt", ["png", "tif", "dcm"])
def test_full_disk_leaves_no_partial_file(tmp_path, monkeypatch, fmt):
    import pydicom

    pixels = np.random.default_rng().integers(0, 4096, (40, 40), dtype=np.uint16)
    if fmt == "dcm":
        source = read_radiograph(make_dicom(tmp_path / "in.dcm", pixels))
        monkeypatch.setattr(pydicom, "dcmwrite", _disk_full_after_some_bytes(pydicom.dcmwrite))
    elif fmt == "tif":
        tifffile.imwrite(tmp_path / "in.tif", pixels)
        source = read_radiograph(tmp_path / "in.tif")
        monkeypatch.setattr(tifffile, "imwrite", _disk_full_after_some_bytes(tifffile.imwrite))
    else:
        write_image(tmp_path / "in.png", pixels)
        source = read_radiograph(tmp_path / "in.png")
        monkeypatch.setattr(images_module, "_save_pil", _disk_full_after_some_bytes(None))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError) as caught:
        write_radiograph(out / f"r.{fmt}", source, source.unit, "soft", PROV)
    assert caught.value.errno == errno.ENOSPC
    assert list(out.iterdir()) == []
