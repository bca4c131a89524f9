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
