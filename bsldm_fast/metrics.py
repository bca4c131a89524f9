"""The BS-LDM evaluation metrics: BSR, MSE, PSNR, SSIM and LPIPS (Sun et al. 2025, Sec. IV-B).

Conventions follow the authors' `metrics.py` (repository diaoquesang/BS-LDM):
- every image is scaled to [0, 1] (uint8 / 255; uint16 / 65535 here as well; floats taken as
  [0, 1]: `preprocess.scale_by_dtype`) and resized to 1024 x 1024 before it is measured, with
  `preprocess.resize`, the resize inference and training use: bilinear with half-pixel centres,
  antialiased when shrinking. NOTE: the original uses OpenCV's INTER_LINEAR, which never
  antialiases; the two agree for images that are 1024 x 1024 already (the paper's and ours) or
  enlarged, and differ when an image larger than 1024 px is shrunk;
- BSR (bone suppression ratio) = 1 - sum(relu(target - pred')^2) / sum(bone^2), where
  bone = cxr - target and pred' = pred + mean(target - pred), the mean-offset correction. As in the
  original, only residuals where the corrected prediction is darker than the target count. BSR is a
  fraction (1 = perfect); "points" in this project are percentage points (0.005);
- MSE on the [0, 1] scale; PSNR = 10 log10(1 / MSE) in dB, 100 when the images are identical.
  NOTE: the original computes PSNR on uint8 arrays, whose subtraction and squaring wrap around
  modulo 256, so its PSNR is too high whenever pixels differ by 16 grey levels or more. Here the
  difference is taken in floating point, which agrees with the original whenever all 8-bit
  differences are below 16 and is the correct value otherwise;
- SSIM (Wang et al. 2004): 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1,
  population statistics, averaged over the pixels whose window lies inside the image, which is
  skimage's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)`;
- LPIPS (AlexNet) as the original calls it, [0, 1] single-channel inputs, only when the `lpips`
  package and its backbone weights are present locally; nothing is downloaded.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .preprocess import resize, scale_by_dtype

logger = logging.getLogger(__name__)

METRIC_SIZE = 1024
"""The resolution every metric is computed at, as in the original evaluation."""

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate * sigma + 0.5) with truncate 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_metric_size(image: np.ndarray, size: int | None = METRIC_SIZE) -> np.ndarray:
    """A 2-D image resized to size x size by `preprocess.resize`; `None` keeps its size."""
    if size is None or image.shape == (size, size):
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
    return resize(tensor, size)[0, 0].numpy()


def _prepare(*images: np.ndarray, size: int | None) -> list[np.ndarray]:
    return [to_metric_size(scale_by_dtype(image), size) for image in images]


def bsr(cxr: np.ndarray, target: np.ndarray, pred: np.ndarray, size: int | None = METRIC_SIZE) -> float:
    """Bone suppression ratio with the original's mean-offset correction (BS-LDM `metrics.py`).

    NaN when the CXR equals the target (no bone to suppress)."""
    cxr, target, pred = _prepare(cxr, target, pred, size=size)
    bone = cxr - target
    pred = pred + np.mean(target - pred)
    residual = np.maximum(target - pred, 0.0)
    bone_energy = float(np.sum(bone**2))
    if bone_energy == 0.0:
        return float("nan")
    return 1.0 - float(np.sum(residual**2)) / bone_energy


def mse(target: np.ndarray, pred: np.ndarray, size: int | None = METRIC_SIZE) -> float:
    """Mean squared error on the [0, 1] scale."""
    target, pred = _prepare(target, pred, size=size)
    return float(np.mean((target - pred) ** 2))


def psnr(target: np.ndarray, pred: np.ndarray, size: int | None = METRIC_SIZE) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1 (255 in 8 bits); 100 for identical images."""
    error = mse(target, pred, size)
    if error == 0.0:
        return 100.0
    return 10.0 * math.log10(1.0 / error)


def _gaussian_window() -> torch.Tensor:
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-0.5 * (taps / SSIM_SIGMA) ** 2)
    return window / window.sum()


def _filter(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of [N, 1, H, W]: only windows inside the image, the
    region skimage averages over after cropping its border."""
    x = F.conv2d(x, window.view(1, 1, 1, -1))
    return F.conv2d(x, window.view(1, 1, -1, 1))


def ssim(target: np.ndarray, pred: np.ndarray, size: int | None = METRIC_SIZE) -> float:
    """Mean structural similarity (Wang et al. 2004) with an 11-tap Gaussian window, sigma 1.5."""
    target, pred = _prepare(target, pred, size=size)
    if min(target.shape) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} pixels a side")
    window = _gaussian_window()
    x = torch.from_numpy(np.ascontiguousarray(target))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    # One filtering pass over the five moments.
    moments = _filter(torch.cat([x, y, x * x, y * y, x * y]), window)
    mx, my, mxx, myy, mxy = moments
    vx, vy, cxy = mxx - mx * mx, myy - my * my, mxy - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# ----------------------------------------------------------------------------- LPIPS


class LPIPSUnavailable(RuntimeError):
    """LPIPS cannot run here; the message says what is missing."""


def _alexnet_checkpoint() -> Path | None:
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(checkpoints.glob("alexnet-*.pth")) if checkpoints.is_dir() else []
    return found[0] if found else None


class LPIPS:
    """LPIPS (Zhang et al. 2018, AlexNet), called as the BS-LDM evaluation calls it. Construction
    raises `LPIPSUnavailable` unless the `lpips` package and the AlexNet weights are local."""

    def __init__(self):
        try:
            import lpips  # noqa: F401
        except ImportError as error:
            raise LPIPSUnavailable("LPIPS skipped: the 'lpips' package is not installed "
                                   "(pip install lpips)") from error
        if _alexnet_checkpoint() is None:
            raise LPIPSUnavailable(
                "LPIPS skipped: the AlexNet backbone weights are not in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'}; nothing is downloaded here"
            )
        import lpips

        self.model = lpips.LPIPS(net="alex", verbose=False).eval()

    @torch.inference_mode()
    def __call__(self, target: np.ndarray, pred: np.ndarray, size: int | None = METRIC_SIZE) -> float:
        target, pred = _prepare(target, pred, size=size)
        a = torch.from_numpy(target).float()[None, None]
        b = torch.from_numpy(pred).float()[None, None]
        return float(self.model(a, b).item())


def load_lpips() -> tuple[LPIPS | None, str | None]:
    """An LPIPS scorer, or None and the reason it is skipped."""
    try:
        return LPIPS(), None
    except LPIPSUnavailable as error:
        return None, str(error)


# ----------------------------------------------------------------------------- all at once


@dataclass(frozen=True)
class Scores:
    """The metrics of one prediction; BSR is None without a CXR, LPIPS None when skipped."""

    bsr: float | None
    mse: float
    psnr: float
    ssim: float
    lpips: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {"bsr": self.bsr, "mse": self.mse, "psnr": self.psnr, "ssim": self.ssim,
                "lpips": self.lpips}


def evaluate(pred: np.ndarray, target: np.ndarray, cxr: np.ndarray | None = None,
             lpips_model: LPIPS | None = None, size: int | None = METRIC_SIZE) -> Scores:
    """Every metric of one prediction against its soft-tissue target (and CXR, for BSR)."""
    p, t = _prepare(pred, target, size=size)
    c = None if cxr is None else to_metric_size(scale_by_dtype(cxr), size)
    return Scores(
        bsr=None if c is None else bsr(c, t, p, size=None),
        mse=mse(t, p, size=None),
        psnr=psnr(t, p, size=None),
        ssim=ssim(t, p, size=None),
        lpips=None if lpips_model is None else lpips_model(t, p, size=None),
    )
