"""The batch engine with a stand-in model (display-space arithmetic), so every value can be checked.

The real model runs through the same engine in tests/test_cli.py and tests/test_suppressor.py.
"""

import errno
import hashlib
import json

import numpy as np
import pydicom
import pytest
import tifffile
from dicom_factory import make_dicom

from bsldm_fast.io import BatchOptions, ImageError, Provenance, read_image, run_batch, write_image
from bsldm_fast.io import images as images_module
from bsldm_fast.io.batch import REPORT_NAME

PROV = Provenance(model="stand-in", sampler="ddim", steps=3, seed=0, version="0")


def darker(units):
    """A stand-in for the model: soft = 0.75 x CXR, exactly representable."""
    return [u * 0.75 for u in units]


@pytest.fixture
def tree(tmp_path):
    rng = np.random.default_rng()
    root = tmp_path / "in"
    write_image(root / "a.png", rng.integers(0, 256, (40, 36), dtype=np.uint8))
    write_image(root / "sub" / "b.png", rng.integers(0, 65536, (33, 48), dtype=np.uint16))
    write_image(root / "sub" / "c.jpg", rng.integers(0, 256, (50, 40), dtype=np.uint8))
    (root / "sub" / "deep").mkdir()
    tifffile.imwrite(root / "sub" / "deep" / "d.tif", rng.random((36, 36)).astype(np.float32) * 900)
    make_dicom(root / "sub" / "deep" / "IM0001", rng.integers(0, 4096, (40, 40), dtype=np.uint16),
               bits_stored=12)
    (root / "notes.txt").write_text("ignored: not an image")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")
    return root


def _digest(root):
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


RELS = ["a.png", "sub/b.png", "sub/c.jpg", "sub/deep/d.tif", "sub/deep/IM0001"]


def test_folder_keeps_relative_paths_formats_and_values(tree, tmp_path):
    before = _digest(tree)
    out = tmp_path / "out"
    result = run_batch(darker, PROV, [tree], out, BatchOptions(progress=False))
    assert result.ok and len(result.written) == 5
    assert _digest(tree) == before  # inputs untouched, byte for byte and in mtime
    for rel in RELS:
        src, dst = read_image(tree / rel), read_image(out / rel)
        assert dst.shape == src.shape and dst.dtype == src.dtype, rel
    a = read_image(tree / "a.png")
    # float32 display space: exact but for ties at .5 (one grey level)
    np.testing.assert_allclose(read_image(out / "a.png"), a * 0.75, atol=0.5 + 1e-3)
    d = read_image(tree / "sub/deep/d.tif")
    np.testing.assert_allclose(read_image(out / "sub/deep/d.tif"),
                               d.min() + (d - d.min()) * 0.75, rtol=1e-5)
    assert pydicom.dcmread(out / "sub/deep/IM0001").ImageType == ["DERIVED", "SECONDARY"]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["counts"] == {"total": 5, "written": 5, "skipped": 0, "failed": 0}


def test_bone_and_review_outputs(tree, tmp_path):
    out = tmp_path / "out"
    result = run_batch(darker, PROV, [tree / "a.png"], out,
                       BatchOptions(bone=True, side_by_side=True, progress=False))
    assert result.ok
    a = read_image(tree / "a.png").astype(float)
    bone = read_image(out / "a.bone.png")
    np.testing.assert_allclose(bone, a * 0.25, atol=1.0)  # CXR - soft, rounded to 8 bits
    review = read_image(out / "a.png.review.png")
    assert review.shape == (40, 3 * 36 + 2 * 4) and review.dtype == np.uint8


def test_skip_existing_resumes_and_overwrite_replaces(tree, tmp_path):
    out = tmp_path / "out"
    first = run_batch(darker, PROV, [tree], out, BatchOptions(progress=False))
    stamp = (out / "a.png").stat().st_mtime_ns
    again = run_batch(darker, PROV, [tree], out, BatchOptions(progress=False))
    assert first.ok and not again.ok
    assert all("output exists" in o.reason for o in again.failed)
    skip = run_batch(darker, PROV, [tree], out, BatchOptions(skip_existing=True, progress=False))
    assert skip.ok and len(skip.skipped) == 5 and (out / "a.png").stat().st_mtime_ns == stamp
    # asking for a new extra output computes only what is missing
    bone = run_batch(darker, PROV, [tree], out, BatchOptions(skip_existing=True, bone=True,
                                                             progress=False))
    assert bone.ok and len(bone.written) == 5 and (out / "a.bone.png").exists()
    assert (out / "a.png").stat().st_mtime_ns == stamp
    write_image(out / "a.png", np.zeros((40, 36), np.uint8), overwrite=True)
    replaced = run_batch(darker, PROV, [tree / "a.png"], out, BatchOptions(overwrite=True,
                                                                          progress=False))
    assert replaced.ok and read_image(out / "a.png").max() > 0
    with pytest.raises(ValueError, match="exclude"):
        BatchOptions(overwrite=True, skip_existing=True)


def test_output_folder_equal_to_or_inside_an_input_folder_is_refused(tree):
    before = _digest(tree)
    for out in (tree, tree / "sub", tree / "new"):
        with pytest.raises(ImageError, match="choose an output folder outside the inputs"):
            run_batch(darker, PROV, [tree], out, BatchOptions(progress=False))
    assert _digest(tree) == before


def test_an_output_onto_an_input_file_is_refused(tree):
    before = _digest(tree)
    result = run_batch(darker, PROV, [tree / "a.png"], tree, BatchOptions(overwrite=True,
                                                                         progress=False))
    assert not result.ok and "would overwrite an input" in result.failed[0].reason
    report = tree / REPORT_NAME
    assert report.exists()
    report.unlink()
    assert _digest(tree) == before


def test_two_inputs_with_one_output_name(tree, tmp_path):
    other = tmp_path / "other"
    write_image(other / "a.png", np.zeros((40, 40), np.uint8))
    result = run_batch(darker, PROV, [tree / "a.png", other / "a.png"], tmp_path / "out",
                       BatchOptions(progress=False))
    assert len(result.written) == 1 and "is also the output of" in result.failed[0].reason


def test_bad_files_are_reported_and_the_run_goes_on(tree, tmp_path):
    (tree / "empty.png").write_bytes(b"")
    (tree / "sub" / "text.png").write_text("not an image")
    write_image(tree / "tiny.png", np.zeros((8, 8), np.uint8))
    make_dicom(tree / "nopix.dcm", np.zeros((32, 32), np.uint16), pixel_data=False)
    out = tmp_path / "out"
    result = run_batch(darker, PROV, [tree], out, BatchOptions(progress=False))
    assert len(result.written) == 5 and len(result.failed) == 4 and not result.ok
    report = json.loads((out / REPORT_NAME).read_text())
    reasons = {f["source"].split("/in/")[1]: f["reason"] for f in report["failures"]}
    assert "empty file" in reasons["empty.png"]
    assert "holds text" in reasons["sub/text.png"]
    assert "too small" in reasons["tiny.png"]
    assert "without pixel data" in reasons["nopix.dcm"]
    assert not any(p.name.endswith(".part") for p in out.rglob("*"))


def test_warnings_reach_the_report(tree, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tree / "rgb.png")
    out = tmp_path / "out"
    result = run_batch(darker, PROV, [tree / "rgb.png"], out, BatchOptions(progress=False))
    assert result.ok
    report = json.loads((out / REPORT_NAME).read_text())
    assert "converted to grey" in report["warnings"][0]["warning"]


def test_same_size_and_mixed_images_are_batched(tree, tmp_path):
    calls = []

    def recording(units):
        calls.append([u.shape for u in units])
        return darker(units)

    result = run_batch(recording, PROV, [tree], tmp_path / "out", BatchOptions(progress=False),
                       batch_size=2)
    assert result.ok and [len(c) for c in calls] == [2, 2, 1]


def test_a_failing_model_batch_fails_its_images_only(tree, tmp_path):
    calls = []

    def flaky(units):
        calls.append(len(units))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return darker(units)

    result = run_batch(flaky, PROV, [tree], tmp_path / "out", BatchOptions(progress=False),
                       batch_size=2)
    assert len(result.failed) == 2 and len(result.written) == 3
    assert "out of memory" in result.failed[0].reason


def test_a_full_disk_stops_the_run_and_leaves_no_partial_file(tree, tmp_path, monkeypatch):
    real = images_module._save_pil
    count = []

    def filling(tmp, *args, **kwargs):
        count.append(tmp)
        if len(count) >= 2:
            with open(tmp, "wb") as handle:
                handle.write(b"half an image")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, *args, **kwargs)

    monkeypatch.setattr(images_module, "_save_pil", filling)
    out = tmp_path / "out"
    result = run_batch(darker, PROV, [tree], out, BatchOptions(progress=False), batch_size=1)
    statuses = [o.status for o in result.outcomes]
    assert statuses == ["written", "failed", "not attempted", "not attempted", "not attempted"]
    assert "No space left" in result.failed[0].reason
    assert "disk is full" in result.failed[1].reason
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["a.png", REPORT_NAME]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["counts"]["failed"] == 4


def test_interrupt_writes_the_report(tree, tmp_path):
    def interrupted(units):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_batch(interrupted, PROV, [tree], out, BatchOptions(progress=False))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["interrupted"] and report["counts"]["failed"] == 5
