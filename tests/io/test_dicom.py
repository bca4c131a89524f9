import warnings

import numpy as np
import pydicom
import pytest
from dicom_factory import make_dicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from bsldm_fast.io import ImageError, Provenance, read_radiograph, transfer_syntaxes, write_radiograph
from bsldm_fast.io.dicom import derived_dataset, read_dicom

PROV = Provenance(model="models/paper", sampler="dpmpp", steps=20, seed=0, version="0.1.0")


def _bundled(name):
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when it cannot download its optional files
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return path


def _window_reference(values, centre, width):
    """PS3.3 C.11.2.1.2.1 LINEAR window, written out: 0 below, 1 above, linear between."""
    out = np.empty(values.shape)
    for i, x in enumerate(values.ravel()):
        if x <= centre - 0.5 - (width - 1) / 2:
            out.flat[i] = 0.0
        elif x > centre - 0.5 + (width - 1) / 2:
            out.flat[i] = 1.0
        else:
            out.flat[i] = ((x - (centre - 0.5)) / (width - 1) + 0.5)
    return out


def test_modality_lut_and_window_match_the_standard(tmp_path):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 4096, (40, 36), dtype=np.uint16)
    slope, intercept, centre, width = 0.5, -1024.0, -300.0, 1500.0
    path = make_dicom(tmp_path / "ct.dcm", pixels, bits_stored=12, RescaleSlope=slope,
                      RescaleIntercept=intercept, WindowCenter=centre, WindowWidth=width)
    unit = read_radiograph(path).unit
    expected = _window_reference(pixels * slope + intercept, centre, width)
    np.testing.assert_allclose(unit, expected, atol=1e-6)


def test_window_matches_pydicom_windowing(tmp_path):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 1024, (33, 40), dtype=np.uint16)
    path = make_dicom(tmp_path / "w.dcm", pixels, bits_stored=10, WindowCenter=400, WindowWidth=300)
    from pydicom.pixels import apply_windowing

    reference = apply_windowing(pixels.astype(float), pydicom.dcmread(path)) / 1023.0
    np.testing.assert_allclose(read_radiograph(path).unit, reference, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_functions(tmp_path, function):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 2000, (32, 32), dtype=np.uint16)
    path = make_dicom(tmp_path / "f.dcm", pixels, WindowCenter=1000, WindowWidth=800,
                      VOILUTFunction=function)
    x = pixels.astype(float)
    expected = (np.clip((x - 1000) / 800 + 0.5, 0, 1) if function == "LINEAR_EXACT"
                else 1 / (1 + np.exp(-4 * (x - 1000) / 800)))
    np.testing.assert_allclose(read_radiograph(path).unit, expected, atol=1e-6)


def test_voi_lut_sequence_is_applied(tmp_path):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 256, (32, 40), dtype=np.uint16)
    table = np.sqrt(np.arange(256) / 255.0) * 4095  # a gamma-like display curve
    item = Dataset()
    item.LUTDescriptor = [256, 0, 12]
    item.add_new(0x00283006, "US", np.rint(table).astype(np.uint16).tolist())  # LUT Data
    path = make_dicom(tmp_path / "lut.dcm", pixels, VOILUTSequence=[item], WindowCenter=10,
                      WindowWidth=5)
    unit = read_radiograph(path).unit
    np.testing.assert_allclose(unit, np.rint(table)[pixels] / 4095.0, atol=1e-6)
    # the inverse is exact on the table's levels
    image = read_dicom(path)
    assert np.array_equal(image.to_stored(unit), pixels)


def test_monochrome1_is_inverted_and_restored(tmp_path):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 1024, (36, 40), dtype=np.uint16)
    m1 = read_radiograph(make_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    m2 = read_radiograph(make_dicom(tmp_path / "m2.dcm", pixels))
    np.testing.assert_allclose(m1.unit, 1.0 - m2.unit, atol=1e-6)
    # dense is bright for the model in both: the largest MONOCHROME2 value is the brightest pixel
    assert m2.unit.flat[pixels.argmax()] == 1.0 and m1.unit.flat[pixels.argmax()] == 0.0
    write_radiograph(tmp_path / "out.dcm", m1, m1.unit, "soft", PROV)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(out.pixel_array, pixels)


@pytest.mark.parametrize("dtype, bits", [(np.uint16, 12), (np.int16, 12), (np.uint8, 8), (np.int16, 16)])
def test_round_trip_keeps_pixel_representation(tmp_path, dtype, bits):
    rng = np.random.default_rng()
    low = -(2 ** (bits - 1)) if np.dtype(dtype).kind == "i" else 0
    pixels = rng.integers(low, low + 2**bits, (34, 41)).astype(dtype)
    stored = pixels.copy()
    if bits < np.dtype(dtype).itemsize * 8 and np.dtype(dtype).kind == "u":
        stored |= np.array(0xF000, dtype)  # garbage above Bits Stored must be masked off
    path = make_dicom(tmp_path / "in.dcm", stored, bits_stored=bits)
    source = read_radiograph(path)
    assert np.array_equal(source.dicom.pixels, pixels)
    write_radiograph(tmp_path / "out.dcm", source, source.unit, "soft", PROV)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert (out.BitsAllocated, out.BitsStored, out.PixelRepresentation) == \
        (np.dtype(dtype).itemsize * 8, bits, int(np.dtype(dtype).kind == "i"))
    assert np.array_equal(out.pixel_array, pixels)


def test_outside_the_window_lands_on_its_edge(tmp_path):
    pixels = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (32, 1))
    path = make_dicom(tmp_path / "w.dcm", pixels, WindowCenter=2000.5, WindowWidth=1001)
    image = read_dicom(path)
    back = image.to_stored(image.unit)
    inside = (pixels > 1500) & (pixels < 2500)
    assert np.array_equal(back[inside], pixels[inside])
    assert back[pixels <= 1500].max() == 1500 and back[pixels >= 2500].min() == 2500


def test_result_is_a_derived_instance_and_nothing_else_changes(tmp_path):
    rng = np.random.default_rng()
    pixels = rng.integers(0, 4096, (40, 32), dtype=np.uint16)
    path = make_dicom(tmp_path / "in.dcm", pixels, bits_stored=12, WindowCenter=2048,
                      WindowWidth=4096, ImageComments="keep me", InstanceNumber=7)
    source = read_radiograph(path)
    soft = np.clip(source.unit * 0.8, 0, 1)
    write_radiograph(tmp_path / "out.dcm", source, soft, "soft", PROV)
    write_radiograph(tmp_path / "bone.dcm", source, source.unit - soft, "bone", PROV)
    before, after = pydicom.dcmread(path), pydicom.dcmread(tmp_path / "out.dcm")
    bone = pydicom.dcmread(tmp_path / "bone.dcm")
    assert after.SOPInstanceUID != before.SOPInstanceUID
    assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert bone.SeriesInstanceUID not in (before.SeriesInstanceUID, after.SeriesInstanceUID)
    assert (after.StudyInstanceUID, after.PatientID, after.PatientName) == \
        (before.StudyInstanceUID, before.PatientID, before.PatientName)
    assert list(after.ImageType) == ["DERIVED", "SECONDARY"]
    # the model's name (here the folder's, as PROV gives no config name), the path only in the
    # Derivation Description
    assert after.SeriesDescription == "Bone-suppressed (bsldm_fast, paper)"
    assert "models/paper" in after.DerivationDescription
    assert "Bone image" in bone.SeriesDescription
    assert "dpmpp 20 steps" in after.DerivationDescription
    ref = after.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == before.SOPInstanceUID
    changed = {"SOPInstanceUID", "SeriesInstanceUID", "ImageType", "SeriesDescription",
               "DerivationDescription", "SourceImageSequence", "PixelData"}
    keys = {e.keyword for e in before} | {e.keyword for e in after}
    for key in keys - changed:
        assert before.get(key) == after.get(key), key
    expected = read_dicom(path).to_stored(soft)
    assert np.array_equal(after.pixel_array, expected)
    assert after.pixel_array.dtype == before.pixel_array.dtype


def test_same_inputs_and_settings_give_the_same_uids(tmp_path):
    path = make_dicom(tmp_path / "in.dcm", np.zeros((32, 32), np.uint16))
    image = read_dicom(path)
    a = derived_dataset(image, image.pixels, "soft", PROV)
    b = derived_dataset(image, image.pixels, "soft", PROV)
    c = derived_dataset(image, image.pixels, "soft", Provenance("other", "ddim", 5, 1, "0.1.0"))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    assert a.SOPInstanceUID != c.SOPInstanceUID and a.SeriesInstanceUID != c.SeriesInstanceUID
    from pydicom.uid import UID

    assert UID(a.SOPInstanceUID).is_valid and UID(a.SeriesInstanceUID).is_valid


SYNTAXES = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
            "MR_small_jp2klossless.dcm"]


@pytest.mark.parametrize("name", SYNTAXES)
def test_transfer_syntaxes_decode_to_the_same_image(tmp_path, name):
    reference = read_radiograph(_bundled("MR_small.dcm"))
    image = read_radiograph(_bundled(name))
    np.testing.assert_array_equal(image.unit, reference.unit)
    write_radiograph(tmp_path / "out.dcm", image, image.unit, "soft", PROV)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    syntax = pydicom.dcmread(_bundled(name)).file_meta.TransferSyntaxUID
    expected = syntax if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, "1.2.840.10008.1.2.5") \
        else ExplicitVRLittleEndian
    assert out.file_meta.TransferSyntaxUID == expected
    assert np.array_equal(out.pixel_array, image.dicom.to_stored(image.unit))


def test_deflated_syntax_is_read_and_kept(tmp_path):
    image = read_radiograph(_bundled("image_dfl.dcm"))
    write_radiograph(tmp_path / "out.dcm", image, image.unit, "soft", PROV)
    out = pydicom.dcmread(tmp_path / "out.dcm")
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    assert np.array_equal(out.pixel_array, image.dicom.pixels)


def test_a_missing_decoder_is_named():
    with pytest.raises(ImageError, match="JPEG-LS.*install one of.*pylibjpeg"):
        read_radiograph(_bundled("MR_small_jpeg_ls_lossless.dcm"))


def test_twelve_bit_jpeg_says_why():
    with pytest.raises(ImageError, match="12-bit"):
        read_radiograph(_bundled("JPEG-lossy.dcm"))


def test_support_table_lists_uncompressed_and_missing():
    rows = {r["name"]: r for r in transfer_syntaxes()}
    assert rows["Explicit VR Little Endian"]["supported"]
    assert rows["RLE Lossless"]["supported"]
    for row in rows.values():
        assert row["supported"] or row["missing"], row


def test_multi_frame_and_colour_are_refused(tmp_path):
    with pytest.raises(ImageError, match="multi-frame"):
        read_radiograph(_bundled("rtdose.dcm"))
    path = make_dicom(tmp_path / "two.dcm", np.zeros((2 * 32, 32), np.uint16), Rows=32,
                      NumberOfFrames=2)
    with pytest.raises(ImageError, match="multi-frame.*2 frames"):
        read_radiograph(path)
    path = make_dicom(tmp_path / "rgb.dcm", np.zeros((32, 96), np.uint8), Columns=32,
                      SamplesPerPixel=3, photometric="RGB", PlanarConfiguration=0)
    with pytest.raises(ImageError, match="RGB"):
        read_radiograph(path)


def test_dicom_without_pixel_data(tmp_path):
    path = make_dicom(tmp_path / "nopix.dcm", np.zeros((32, 32), np.uint16), pixel_data=False)
    with pytest.raises(ImageError, match="without pixel data"):
        read_radiograph(path)
    with pytest.raises(ImageError, match="without pixel data"):
        read_radiograph(_bundled("reportsi.dcm"))
