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
        # Measured on pair 2 (the model trained on pairs 0 and 1), fp32, 2026-12-01: PSNR 22.35 dB
        # vs 20.16 for the identity (+2.18 dB), MSE 0.0058 vs 0.0096, SSIM 0.807 vs 0.815. The model
        # does NOT beat the identity on SSIM (see its README); the floor below catches a broken or
        # untrained model, which loses far more. 1 dB of PSNR margin leaves room for rounding.
        assert model.psnr - ident.psnr > 1.0, (name, model, ident)
        assert model.mse < ident.mse, (name, model, ident)
        assert model.ssim > ident.ssim - 0.03, (name, model, ident)
