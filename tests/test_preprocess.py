"""`preprocess`: the one resize against plain F.interpolate, and the model input/output maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bsldm_fast import preprocess
from bsldm_fast.config import InputNormalization, preset


def _reference(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


@pytest.mark.parametrize("shape, size", [
    ((2, 1, 97, 130), (64, 64)),     # shrinking both sides: antialiased
    ((1, 1, 33, 47), (64, 64)),      # enlarging: plain bilinear
    ((3, 1, 80, 50), (64, 64)),      # one side shrinks, one grows: antialiased
    ((1, 2, 64, 64), (31, 77)),      # non-square target, two channels
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_is_bilinear_antialiased_when_shrinking(gen, shape, size, dtype):
    images = torch.rand(shape, generator=gen, dtype=dtype)
    out = preprocess.resize(images, size)
    assert torch.equal(out, _reference(images, size))
    if size[0] == size[1]:
        assert torch.equal(preprocess.resize(images, size[0]), out)


def test_resize_to_the_same_size_is_the_image_itself(gen):
    images = torch.rand(1, 1, 40, 56, generator=gen)
    assert preprocess.resize(images, (40, 56)) is images


def test_model_range_round_trip(gen):
    unit = torch.rand(2, 1, 8, 8, generator=gen)
    assert torch.equal(preprocess.to_model_range(unit), unit * 2.0 - 1.0)
    torch.testing.assert_close(preprocess.from_model_range(preprocess.to_model_range(unit)), unit)


def test_model_input_and_outputs_undo_each_other(gen):
    config = preset("tiny").replace(input_normalization=InputNormalization(mode="percentile"))
    unit = (0.2 + 0.5 * torch.rand(90, 70, generator=gen)).numpy()
    prepared = preprocess.model_input(unit, config)
    assert prepared.tensor.shape == (1, 1, 64, 64) and prepared.size == (90, 70)
    display = preprocess.resize(torch.from_numpy(unit)[None, None], 64)
    assert torch.equal(prepared.display, display)
    assert prepared.scale != 1.0  # the percentile normalisation stretched this low-contrast image
    torch.testing.assert_close(prepared.tensor, (display * prepared.scale + prepared.offset) * 2 - 1)
    # The identity network gives the input back, at the input's size.
    (back,) = preprocess.model_outputs(prepared.tensor, [prepared], config)
    assert back.shape == unit.shape and back.dtype == np.float32
    again = preprocess.resize(display, (90, 70))[0, 0].numpy()
    np.testing.assert_allclose(back, np.clip(again, 0, 1), atol=1e-6)


def test_model_input_refuses_a_degenerate_image():
    with pytest.raises(ValueError, match="too small"):
        preprocess.model_input(np.zeros((1, 40), np.float32), preset("tiny"))
