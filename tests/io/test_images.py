import numpy as np
import pytest
from PIL import Image

from bsldm_fast.io import ImageError, find_images, read_image, write_image


@pytest.mark.parametrize("dtype, suffix", [(np.uint8, ".png"), (np.uint16, ".png"), (np.uint8, ".jpg")])
def test_round_trip(tmp_path, dtype, suffix):
    rng = np.random.default_rng()
    image = rng.integers(0, np.iinfo(dtype).max + 1, (37, 53), dtype=dtype)
    path = write_image(tmp_path / f"x{suffix}", image)
    back = read_image(path)
    assert back.dtype == dtype and back.shape == image.shape
    if suffix == ".png":
        assert np.array_equal(back, image)


def test_rgb_is_converted_with_a_warning(tmp_path):
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.warns(UserWarning, match="grey"):
        assert read_image(tmp_path / "rgb.png").shape == (8, 9)


def test_unreadable_files_raise_image_error(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    for name in ("empty.png", "text.png", "x.bmp"):
        with pytest.raises(ImageError, match=name):
            read_image(tmp_path / name)


def test_write_never_overwrites_unless_asked(tmp_path):
    image = np.zeros((4, 4), np.uint8)
    write_image(tmp_path / "a.png", image)
    with pytest.raises(ImageError, match="exists"):
        write_image(tmp_path / "a.png", image + 1)
    assert read_image(tmp_path / "a.png").max() == 0
    write_image(tmp_path / "a.png", image + 1, overwrite=True)
    assert read_image(tmp_path / "a.png").max() == 1


def test_sixteen_bit_jpeg_is_refused(tmp_path):
    with pytest.raises(ImageError, match="JPEG"):
        write_image(tmp_path / "a.jpg", np.zeros((4, 4), np.uint16))
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(self, fp, format=None, **kw):
        with open(fp, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_find_images_recurses_and_keeps_relative_paths(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ("one.png", "a/two.jpg", "a/b/three.PNG", "a/notes.txt"):
        (tmp_path / rel).write_bytes(b"")
    jobs = find_images([tmp_path])
    assert sorted(str(j.relative) for j in jobs) == ["a/b/three.PNG", "a/two.jpg", "one.png"]
    with pytest.raises(ImageError, match="no such"):
        find_images([tmp_path / "missing"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int16])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_round_trip(tmp_path, dtype, compression):
    import tifffile

    rng = np.random.default_rng()
    image = (rng.random((33, 47)) * 30000).astype(dtype)
    tifffile.imwrite(tmp_path / "in.tif", image, compression=compression)
    back = read_image(tmp_path / "in.tif")
    assert back.dtype == dtype and np.array_equal(back, image)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_and_is_restored(tmp_path, orientation):
    from PIL import ImageOps

    from bsldm_fast.io.images import read_raster, stored, upright

    rng = np.random.default_rng()
    image = Image.fromarray(rng.integers(0, 256, (40, 56), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "o.png", exif=exif)
    raster = read_raster(tmp_path / "o.png")
    assert raster.orientation == orientation
    with Image.open(tmp_path / "o.png") as opened:
        reference = np.asarray(ImageOps.exif_transpose(opened))
    shown = upright(raster.pixels, orientation)
    assert np.array_equal(shown, reference)
    assert np.array_equal(stored(shown, orientation), raster.pixels)


def test_content_decides_the_format_with_a_warning(tmp_path):
    image = np.random.default_rng().integers(0, 65536, (32, 40), dtype=np.uint16)
    write_image(tmp_path / "x.png", image)
    (tmp_path / "x.png").rename(tmp_path / "x.jpg")
    with pytest.warns(UserWarning, match="named .jpg but holds PNG"):
        assert np.array_equal(read_image(tmp_path / "x.jpg"), image)


def test_lzw_tiff_is_read_through_pillow(tmp_path):
    image = np.random.default_rng().integers(0, 65536, (40, 44), dtype=np.uint16)
    Image.fromarray(image).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    assert np.array_equal(read_image(tmp_path / "lzw.tif"), image)


def test_unsupported_tiff_types_are_refused(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "b.tif", np.zeros((40, 40), np.int8))
    with pytest.raises(ImageError, match="b.tif: TIFF pixels of type int8"):
        read_image(tmp_path / "b.tif")
