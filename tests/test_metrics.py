"""The BS-LDM metrics against hand-computed values, the original's conventions and skimage."""

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from bsldm_fast import metrics
from bsldm_fast.preprocess import scale_by_dtype


def test_scale_by_dtype_scales_by_bit_depth():
    assert scale_by_dtype(np.array([[0, 255]], np.uint8)).tolist() == [[0.0, 1.0]]
    assert scale_by_dtype(np.array([[0, 65535]], np.uint16)).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="NaN"):
        scale_by_dtype(np.array([[np.nan, 0.0]]))
    with pytest.raises(TypeError):
        scale_by_dtype(np.zeros((2, 2), np.int32))


def test_enlarging_to_metric_size_is_half_pixel_bilinear():
    # OpenCV INTER_LINEAR: source pixel centres at 0.5, 1.5; outputs at 0.25, 0.75, ... clamp.
    out = metrics.to_metric_size(np.array([[0.0, 1.0], [0.0, 1.0]]), 4)
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(metrics.to_metric_size(np.full((3, 5), 0.3), 8), 0.3)


def test_mse_and_psnr_by_hand():
    target = np.zeros((2, 2), np.uint8)
    pred = np.array([[255, 0], [0, 0]], np.uint8)
    assert metrics.mse(target, pred, size=None) == pytest.approx(0.25)
    assert metrics.psnr(target, pred, size=None) == pytest.approx(10 * math.log10(4))
    assert metrics.psnr(pred, pred, size=None) == 100.0
    # Resizing to 1024 first (bilinear of a 2x2 impulse) changes the value, as in the original.
    assert metrics.mse(target, pred) != pytest.approx(0.25)


def _psnr_original(target_u8, pred_u8):
    """The original's arithmetic: uint8 difference and square (wrapping modulo 256)."""
    error = np.mean((target_u8 - pred_u8) ** 2)
    return 100.0 if error == 0 else 20 * math.log10(255.0 / math.sqrt(error))


def test_psnr_matches_the_original_for_small_differences():
    rng = np.random.default_rng(0)
    target = rng.integers(20, 230, (32, 32), dtype=np.uint8)
    pred = (target.astype(int) + rng.integers(-15, 16, target.shape)).astype(np.uint8)
    assert metrics.psnr(target, pred, size=None) == pytest.approx(_psnr_original(target, pred), abs=1e-9)
    # With differences of 16 levels or more the original's uint8 arithmetic wraps; we do not.
    far = (target.astype(int) + 40).clip(0, 255).astype(np.uint8)
    assert metrics.psnr(target, far, size=None) < _psnr_original(target, far) - 10


def test_bsr_by_hand():
    cxr = np.array([[1.0, 1.0], [0.0, 0.0]])
    target = np.array([[0.5, 0.5], [0.0, 0.0]])
    # bone energy 0.5. pred offset by mean(target - pred) = -0.05 -> residual relu(.05,.05,-.15,.05)
    pred = np.array([[0.5, 0.5], [0.2, 0.0]])
    assert metrics.bsr(cxr, target, pred, size=None) == pytest.approx(1 - 3 * 0.05**2 / 0.5)
    # The identity prediction: offset -0.25, residual relu(-.25, -.25, .25, .25).
    assert metrics.bsr(cxr, target, cxr, size=None) == pytest.approx(0.75)
    # The mean-offset correction makes a constant shift free.
    assert metrics.bsr(cxr, target, target + 0.1, size=None) == pytest.approx(1.0)
    assert math.isnan(metrics.bsr(target, target, cxr, size=None))


def test_bsr_is_resolution_consistent():
    """A bilinear upsample is linear, so BSR at 1024 of a smooth pair is close to the native one."""
    y, x = np.mgrid[0:64, 0:64] / 64.0
    target = 0.4 + 0.2 * np.sin(3 * x) * np.cos(2 * y)
    cxr = target + 0.2 * np.exp(-((y - 0.5) ** 2) / 0.02)
    pred = target + 0.05 * np.exp(-((y - 0.5) ** 2) / 0.02) + 0.01 * np.cos(5 * x)
    assert metrics.bsr(cxr, target, pred) == pytest.approx(metrics.bsr(cxr, target, pred, size=None), abs=2e-3)


@pytest.mark.parametrize("shape", [(64, 64), (37, 53)])
def test_ssim_matches_skimage(shape):
    rng = np.random.default_rng(sum(shape))
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    target = 0.5 + 0.3 * np.sin(x / 5.0) * np.cos(y / 7.0) + 0.05 * rng.standard_normal(shape)
    pred = 0.9 * target + 0.1 * rng.random(shape)
    expected = structural_similarity(target, pred, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
    assert metrics.ssim(target, pred, size=None) == pytest.approx(expected, abs=1e-10)
    assert metrics.ssim(target, target, size=None) == pytest.approx(1.0)


def test_ssim_rejects_tiny_images():
    with pytest.raises(ValueError, match="SSIM"):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)), size=None)


def test_evaluate_combines_the_metrics():
    rng = np.random.default_rng(1)
    target = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    pred = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    cxr = np.clip(target.astype(int) + 30, 0, 255).astype(np.uint8)
    scores = metrics.evaluate(pred, target, cxr, size=64)
    assert scores.bsr == pytest.approx(metrics.bsr(cxr, target, pred, size=64))
    assert scores.psnr == pytest.approx(metrics.psnr(target, pred, size=64))
    assert scores.ssim == pytest.approx(metrics.ssim(target, pred, size=64))
    assert metrics.evaluate(pred, target, size=64).bsr is None


def test_lpips_is_skipped_with_a_reason_when_unavailable():
    model, reason = metrics.load_lpips()
    if model is not None:
        pytest.skip("LPIPS and its weights are present here; nothing to check about skipping")
    assert "LPIPS skipped" in reason
