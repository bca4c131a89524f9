import numpy as np
import pytest
import torch

from bsldm_fast import Suppressor


@pytest.fixture(scope="module")
def suppressor(tiny_model):
    return Suppressor(tiny_model, device="cpu", sampler="dpmpp", steps=4, seed=7)


def _image(rng, dtype, shape=(90, 77)):
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if dtype == np.uint16:
        return rng.integers(0, 65536, shape, dtype=np.uint16)
    return (rng.random(shape) * 3000 - 1000).astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_same_shape_and_dtype(suppressor, dtype):
    image = _image(np.random.default_rng(), dtype)
    out = suppressor(image)
    assert out.shape == image.shape and out.dtype == image.dtype


def test_float_output_stays_in_the_input_range(suppressor):
    image = _image(np.random.default_rng(), np.float32)
    out = suppressor(image)
    assert image.min() - 1e-3 <= out.min() and out.max() <= image.max() + 1e-3


def test_same_seed_same_output(tiny_model):
    image = _image(np.random.default_rng(), np.uint16)
    a = Suppressor(tiny_model, device="cpu", steps=3, seed=11)(image)
    b = Suppressor(tiny_model, device="cpu", steps=3, seed=11)(image)
    c = Suppressor(tiny_model, device="cpu", steps=3, seed=12)(image)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_every_sampler_is_deterministic_per_seed(tiny_model, sampler):
    image = _image(np.random.default_rng(), np.float32, (64, 64))
    runs = [Suppressor(tiny_model, device="cpu", sampler=sampler, steps=5, seed=3)(image) for _ in range(2)]
    assert np.array_equal(*runs)


def test_batch_forms(suppressor):
    rng = np.random.default_rng()
    a, b = _image(rng, np.float32, (64, 64)), _image(rng, np.float32, (80, 50))
    alone = [suppressor(a), suppressor(b)]
    listed = suppressor([a, b])
    assert isinstance(listed, list) and [x.shape for x in listed] == [(64, 64), (80, 50)]
    stacked = suppressor(np.stack([a, a * 0.5]))
    assert stacked.shape == (2, 64, 64)
    # An image's result does not depend on its batch (float rounding of batched convolutions aside).
    np.testing.assert_allclose(listed[0], alone[0], atol=1e-4 * np.ptp(a))
    np.testing.assert_allclose(listed[1], alone[1], atol=1e-4 * np.ptp(b))
    np.testing.assert_allclose(stacked[0], alone[0], atol=1e-4 * np.ptp(a))


def test_batches_larger_than_batch_size(tiny_model):
    s = Suppressor(tiny_model, device="cpu", steps=2, batch_size=2)
    stack = np.random.default_rng().random((5, 40, 40)).astype(np.float32)
    assert s(stack).shape == (5, 40, 40)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 4, 5), np.uint8), "2-D image"),
        (np.zeros((1, 64), np.uint8), "too small"),
        (np.full((8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((8, 8), np.int32), "dtype"),
    ],
)
def test_bad_images_are_refused(suppressor, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        suppressor(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"sampler": "euler"}, "sampler"), ({"steps": 0}, "steps"), ({"precision": "int4"}, "precision"),
     ({"device": "cuda:0"}, "cuda")],
)
def test_bad_settings_are_refused(tiny_model, kwargs, message):
    import torch

    if "device" in kwargs and torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the missing-device error cannot be provoked")
    with pytest.raises(ValueError, match=message):
        Suppressor(tiny_model, **kwargs)


def test_bf16_is_close_to_fp32(tiny_model):
    image = _image(np.random.default_rng(), np.float32, (64, 64))
    fp32 = Suppressor(tiny_model, device="cpu", steps=3, precision="fp32")(image)
    bf16 = Suppressor(tiny_model, device="cpu", steps=3, precision="bf16")(image)
    # bf16 keeps 8 mantissa bits; through a random network the results agree to a few percent.
    assert np.abs(bf16 - fp32).mean() < 0.05 * np.ptp(image)


def test_the_callers_model_is_left_unchanged(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.unet.state_dict().items()}
    Suppressor(tiny_model, device="cpu", precision="bf16")
    after = tiny_model.unet.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_display_space_entry_agrees_with_the_array_api(suppressor):
    from bsldm_fast.preprocess import pixels_to_unit, unit_to_pixels

    image = _image(np.random.default_rng(), np.uint16, (70, 50))
    unit, value_range = pixels_to_unit(image)
    soft = suppressor.suppress_unit([unit])[0]
    assert soft.dtype == np.float32 and soft.shape == image.shape
    assert 0.0 <= soft.min() and soft.max() <= 1.0
    assert np.array_equal(unit_to_pixels(soft, value_range, np.uint16), suppressor(image))


def test_suppress_file_writes_what_the_array_api_returns(suppressor, tmp_path):
    from bsldm_fast.io import ImageError, read_image, write_image

    image = _image(np.random.default_rng(), np.uint16, (48, 40))
    write_image(tmp_path / "in.png", image)
    outcome = suppressor.suppress_file(tmp_path / "in.png", tmp_path / "out" / "soft.png", bone=True)
    assert outcome.status == "written" and len(outcome.outputs) == 2
    assert np.array_equal(read_image(tmp_path / "out" / "soft.png"), suppressor(image))
    assert read_image(tmp_path / "out" / "soft.bone.png").dtype == np.uint16
    with pytest.raises(ImageError, match="output exists"):
        suppressor.suppress_file(tmp_path / "in.png", tmp_path / "out" / "soft.png")
    with pytest.raises(ImageError, match="overwrite an input"):
        suppressor.suppress_file(tmp_path / "in.png", tmp_path / "in.png", overwrite=True)
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        suppressor.suppress_file(tmp_path / "bad.png", tmp_path / "out" / "bad.png")
    assert not (tmp_path / "out" / "bad.png").exists()


def test_suppress_dir_with_a_dicom_and_a_bad_file(suppressor, tmp_path):
    import json
    import shutil
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    from bsldm_fast.io import write_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ct = get_testdata_file("CT_small.dcm")
    if ct is None:
        pytest.skip("pydicom's test file CT_small.dcm is not installed")
    root = tmp_path / "in"
    (root / "series").mkdir(parents=True)
    shutil.copy(ct, root / "series" / "ct.dcm")
    write_image(root / "x.png", _image(np.random.default_rng(), np.uint8, (40, 40)))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = suppressor.suppress_dir(root, tmp_path / "out", progress=False)
    assert not result.ok and len(result.written) == 2
    assert "broken.png" in result.failed[0].source and "cannot read PNG" in result.failed[0].reason
    before, after = pydicom.dcmread(ct), pydicom.dcmread(tmp_path / "out" / "series" / "ct.dcm")
    assert after.StudyInstanceUID == before.StudyInstanceUID
    assert after.SeriesInstanceUID != before.SeriesInstanceUID
    assert after.pixel_array.shape == before.pixel_array.shape
    assert after.pixel_array.dtype == before.pixel_array.dtype
    assert "random:tiny" in after.SeriesDescription or "tiny" in after.SeriesDescription
    report = json.loads(result.report_path.read_text())
    assert report["provenance"]["steps"] == suppressor.steps and report["counts"]["failed"] == 1


# backend= --------------------------------------------------------------------------------------


def test_auto_backend_on_the_cpu_is_the_cpu_pipeline(tiny_model):
    from bsldm_fast.pipeline import Pipeline

    s = Suppressor(tiny_model, device="cpu", steps=2)
    assert s.backend == "torch" and isinstance(s.pipeline, Pipeline)


@pytest.mark.parametrize("backend, error, message", [
    ("onnx", ValueError, "unknown backend"),
    ("tensorrt", RuntimeError, "backend 'tensorrt' cannot run"),
])
def test_backends_that_cannot_run_on_the_cpu_are_refused(tiny_model, backend, error, message):
    with pytest.raises(error, match=message):
        Suppressor(tiny_model, device="cpu", backend=backend)


def test_auto_prefers_tensorrt_then_torch_compile_on_cuda():
    from bsldm_fast.engines.runners import choose_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_backend("auto", cuda, lambda: None) == "tensorrt"
    assert choose_backend("auto", cuda, lambda: "no engine") == "torch-compile"
    assert choose_backend("auto", cpu, lambda: None) == "torch"
    assert choose_backend("torch", cuda, lambda: "no engine") == "torch"
    assert choose_backend("torch-compile", cuda, lambda: None) == "torch-compile"
    with pytest.raises(RuntimeError, match="no engine"):
        choose_backend("tensorrt", cuda, lambda: "no engine")


def test_a_missing_or_stale_engine_names_the_build_command(tiny_model, tmp_path):
    from bsldm_fast.engines.runners import tensorrt_unavailable
    from bsldm_fast.engines.tensorrt import Target
    from bsldm_fast.modeldir import save

    save(tmp_path, tiny_model.config, tiny_model.vqgan, tiny_model.unet)
    target = Target("10.8.0", "NVIDIA H100 80GB HBM3", "9.0")
    cuda = torch.device("cuda")
    reason = tensorrt_unavailable(tmp_path, "fp16", cuda, target)
    assert f"bsldm-fast build-engine {tmp_path} --precision fp16" in reason
    assert "fp16" in tensorrt_unavailable(tmp_path, "fp32", cuda, target)
    assert "model directory" in tensorrt_unavailable(None, "fp16", cuda, target)
    assert "GPU" in tensorrt_unavailable(tmp_path, "fp16", torch.device("cpu"), target)
    # With the three engines cached, TensorRT can run; with a newer TensorRT they are stale.
    from bsldm_fast.engines.cache import ensure_engine
    from bsldm_fast.engines.graphs import GRAPH_NAMES, BatchProfile
    from bsldm_fast.engines.onnx_export import engine_opset
    from bsldm_fast.engines.tensorrt import engine_key, onnx_precision

    for graph in GRAPH_NAMES:
        key = engine_key(tmp_path, tiny_model.config, graph, "fp16", BatchProfile(), target,
                         engine_opset(onnx_precision(graph, "fp16")))
        ensure_engine(tmp_path, key, lambda: b"not a real plan")
    assert tensorrt_unavailable(tmp_path, "fp16", cuda, target) is None
    newer = Target("10.9.0", target.gpu_name, target.compute_capability)
    reason = tensorrt_unavailable(tmp_path, "fp16", cuda, newer)
    assert "stale" in reason and "10.8.0 -> 10.9.0" in reason and "build-engine" in reason


def test_cli_backend_flag(tmp_path, capsys):
    from bsldm_fast.cli import main
    from bsldm_fast.io import write_image

    inputs = tmp_path / "in"
    inputs.mkdir()
    write_image(inputs / "a.png", np.random.default_rng().integers(0, 256, (70, 64), dtype=np.uint8))
    out = tmp_path / "out"
    assert main(["suppress", str(inputs), "-o", str(out), "--steps", "2", "--device", "cpu",
                 "--backend", "torch"]) == 0
    assert (out / "a.png").is_file()
    assert "cpu, fp32, torch" in capsys.readouterr().err
    code = main(["suppress", str(inputs), "-o", str(tmp_path / "out2"), "--device", "cpu",
                 "--backend", "tensorrt"])
    assert code == 2
    assert "backend 'tensorrt' cannot run" in capsys.readouterr().err
