"""The bundled model (bsldm_fast/assets/demo_model): it loads, it names the real pairs that trained it,
and on a real pair it never saw it beats the identity (the CXR itself as the soft tissue) at 1024 px,
with the library's default sampler, as `bsldm-fast suppress` runs it.

Margins come from the measurements stated beside them (benchmarks/results/real-quality-*.json).
"""

import json

import numpy as np
import pytest

from bsldm_fast import Suppressor, metrics
from bsldm_fast.io import read_image
from bsldm_fast.modeldir import DEMO_DIR, load, resolve
from bsldm_fast.preprocess import scale_by_dtype
from bsldm_fast.training.trainer import TRAINING_DATA_FILE

SAMPLES = DEMO_DIR.parents[2] / "assets" / "szch_samples"

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(),
                                reason="the demo model is not bundled in this checkout")


@pytest.fixture(scope="module")
def demo():
    return resolve("demo")


def _held_out() -> list[str]:
    trained = json.loads((DEMO_DIR / TRAINING_DATA_FILE).read_text())["real_pairs"]
    assert trained is not None, "the bundled model must say which real pairs trained it"
    return sorted(p.stem for p in (SAMPLES / "cxr").glob("*.png") if p.stem not in trained)


def test_demo_resolves_to_the_bundled_directory(demo):
    assert demo.source == str(DEMO_DIR)
    assert not demo.is_random
    again = load(DEMO_DIR)
    assert again.config == demo.config
    for a, b in zip(demo.unet.state_dict().values(), again.unet.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy())


def test_demo_loads_with_from_pretrained():
    suppressor = Suppressor.from_pretrained("demo", device="cpu")
    assert suppressor.source == str(DEMO_DIR)
    assert suppressor.config.image_size == 512
    assert suppressor.config.input_normalization.mode == "percentile"
    assert suppressor.config.output_anchor.mode == "input"
    assert suppressor.config.diffusion.quantize_sample


def test_demo_holds_out_a_real_pair():
    assert _held_out(), "every bundled real pair trained the model: nothing left to check it on"


def test_demo_beats_the_identity_on_a_real_pair_it_never_saw(demo):
    suppressor = Suppressor(demo, device="cpu")  # the default sampler (DDPM, 10 steps), seed 0
    for name in _held_out():
        cxr = read_image(SAMPLES / "cxr" / f"{name}.png")
        soft = read_image(SAMPLES / "soft" / f"{name}.png")
        pred = suppressor(cxr)
        assert pred.shape == cxr.shape and pred.dtype == cxr.dtype
        model = metrics.evaluate(pred, soft, cxr)
        ident = metrics.evaluate(cxr, soft, cxr)
        # Measured on pair 2 (the model trained on pairs 0 and 1), fp32, seed 0, 2026-12-01:
        # PSNR 25.30 dB vs 20.16 for the identity (+5.1 dB), SSIM 0.876 vs 0.815 (+0.061), MSE
        # 0.0030 vs 0.0096, BSR 0.932 vs 0.893; over seeds 0-19 the worst is +4.6 dB and +0.035
        # (benchmarks/results/real-quality-seeds-2026-12-01.json). The bounds are issue 14's bar:
        # +3 dB and +0.02 SSIM over the identity.
        assert model.psnr - ident.psnr >= 3.0, (name, model, ident)
        assert model.ssim - ident.ssim >= 0.02, (name, model, ident)
        assert model.mse < ident.mse and model.bsr > ident.bsr, (name, model, ident)
        # Most of the PSNR is the anchor's offset (the CXR - 0.044 alone: 24.07 dB, SSIM 0.816,
        # BSR 0.900); the networks must add to it, in every metric (measured: +1.2 dB, +0.060,
        # +0.033).
        anchored = metrics.evaluate(np.clip(scale_by_dtype(cxr) + demo.config.output_anchor.offset,
                                            0, 1), scale_by_dtype(soft), cxr)
        assert model.psnr > anchored.psnr + 0.5 and model.ssim > anchored.ssim + 0.01, (name, model, anchored)
        assert model.bsr > anchored.bsr + 0.01, (name, model, anchored)


def test_batch_composition_moves_only_a_few_near_tie_patches(demo):
    """With the quantised decode a batch's float32 rounding can tip a near-tie between two codes;
    the README bounds what that may move (measured on these samples: 6.5e-3 at most, 0.03 % of
    the pixels above 1e-3)."""
    images = [scale_by_dtype(read_image(p)).astype(np.float32)
              for p in sorted((SAMPLES / "cxr").glob("*.png"))]
    suppressor = Suppressor(demo, device="cpu", batch_size=len(images))
    batch = suppressor.suppress_unit(images)
    for image, together in zip(images, batch):
        diff = np.abs(together - suppressor.suppress_unit([image])[0])
        assert diff.max() <= 2e-2 and (diff > 1e-3).mean() <= 1e-3
