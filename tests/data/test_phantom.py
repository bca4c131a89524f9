"""The phantom generator: deterministic per seed, resolution-independent anatomy, a non-trivial bone
layer and a soft-tissue layer free of bone structure."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bsldm_fast.data import phantom
from bsldm_fast.io import read_image


def _rows(y0, y1, size):
    """Pixel slice of normalised heights [y0, y1] (y = -1 at the top)."""
    return slice(int((y0 + 1) / 2 * size), int((y1 + 1) / 2 * size))


def _laplacian(a):
    return 4 * a[1:-1, 1:-1] - a[2:, 1:-1] - a[:-2, 1:-1] - a[1:-1, 2:] - a[1:-1, :-2]


def test_deterministic_per_seed():
    a, b = phantom.generate(11, 96), phantom.generate(11, 96)
    for name in ("cxr", "soft", "bone"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = phantom.generate(12, 96)
    assert np.abs(a.cxr - c.cxr).mean() > 0.01, "different seeds must give different anatomy"


@pytest.mark.parametrize("seed", [0, 7])
def test_images_are_consistent(seed):
    p = phantom.generate(seed, 128)
    for image in (p.cxr, p.soft):
        assert image.dtype == np.float32 and image.shape == (128, 128)
        assert image.min() >= 0.0 and image.max() <= 1.0
    np.testing.assert_allclose(p.bone, p.cxr - p.soft, atol=1e-7)
    # Bone only ever adds attenuation, and the display is monotonic.
    assert p.bone.min() >= -1e-6


def test_anatomy_does_not_depend_on_resolution():
    low = phantom.generate(3, 96, noise=False).cxr
    high = phantom.generate(3, 192, noise=False).cxr
    pooled = F.avg_pool2d(torch.from_numpy(high)[None, None], 2)[0, 0].numpy()
    assert np.corrcoef(pooled.ravel(), low.ravel())[0, 1] > 0.99
    assert np.abs(pooled - low).mean() < 0.02


@pytest.mark.parametrize("seed", [1, 5])
def test_bone_layer_is_substantial(seed):
    p = phantom.generate(seed, 128)
    thorax = (_rows(-0.5, 0.2, 128), slice(16, 112))
    # Ribs, spine and clavicles cover a good share of the chest with clear contrast...
    assert 0.15 < (p.bone[thorax] > 0.03).mean() < 0.8
    assert p.bone.std() > 0.02
    # ...and ribs are horizontal-ish bands, so the CXR has far more vertical gradient than the
    # soft-tissue image over the chest.
    dy_cxr = np.abs(np.diff(p.cxr, axis=0))[thorax].mean()
    dy_soft = np.abs(np.diff(p.soft, axis=0))[thorax].mean()
    assert dy_cxr > 1.4 * dy_soft


@pytest.mark.parametrize("seed", [2, 4])
def test_soft_layer_is_smooth_below_the_diaphragm(seed):
    p = phantom.generate(seed, 128, noise=False)
    abdomen = (_rows(0.8, 0.97, 126), slice(35, 50))  # image left, below the right dome
    lungs = (_rows(-0.4, 0.1, 126), slice(20, 50))
    lap = _laplacian(p.soft)
    assert lap[abdomen].std() < 2e-3
    assert _laplacian(p.cxr)[lungs].std() > 5 * lap[abdomen].std()


def test_noise_is_shared_and_scales_with_size():
    stds = {}
    for size in (64, 128):
        clean, noisy = phantom.generate(6, size, noise=False), phantom.generate(6, size)
        residual = noisy.cxr - clean.cxr
        stds[size] = residual.std()
        # One exposure: CXR and target share the noise, so the bone image keeps only a fraction of
        # it (through the curved display); independent noise would give ~1.4x the CXR's.
        assert np.abs(noisy.bone - clean.bone).std() < 0.5 * residual.std()
    # Pixels of half the width collect a quarter of the counts: twice the noise.
    assert 1.7 < stds[128] / stds[64] < 2.3
    assert stds[128] > 2e-4


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size"):
        phantom.generate(0, 2048)


def test_write_dataset(tmp_path):
    out = tmp_path / "set"
    written = phantom.write_dataset(out, 2, size=48, seed=5, bits=16, progress=False)
    assert [p.name for p in written] == ["000005.png", "000006.png"]
    cxr, soft = read_image(out / "CXR" / "000006.png"), read_image(out / "BS" / "000006.png")
    assert cxr.dtype == np.uint16 and cxr.shape == (48, 48)
    expected = phantom.generate(6, 48)
    np.testing.assert_array_equal(cxr, phantom.to_integer(expected.cxr, 16))
    np.testing.assert_array_equal(soft, phantom.to_integer(expected.soft, 16))
    before = (out / "BS" / "000005.png").read_bytes()
    with pytest.raises(FileExistsError):
        phantom.write_dataset(out, 1, size=48, seed=5, progress=False)
    assert (out / "BS" / "000005.png").read_bytes() == before


def test_module_cli(tmp_path):
    assert phantom.main(["--out", str(tmp_path), "--count", "1", "--size", "32", "--bits", "8"]) == 0
    assert read_image(tmp_path / "CXR" / "000000.png").dtype == np.uint8
    assert phantom.main(["--out", str(tmp_path), "--count", "1", "--size", "32"]) == 2
