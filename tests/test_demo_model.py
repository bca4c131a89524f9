"""The bundled demo model (bsldm_fast/assets/demo_model): it loads, and it suppresses bone.

It was trained on synthetic phantoms (training/configs/demo_*.yaml); here it must beat the identity
baseline (the CXR itself as the soft-tissue prediction) on PSNR, on phantoms it never saw, with the
library's default few-step sampler. Margins come from the measurements stated beside them.
"""

import numpy as np
import pytest

from bsldm_fast import Suppressor, metrics
from bsldm_fast.data import phantom
from bsldm_fast.modeldir import DEMO_DIR, load, resolve

# Fresh seeds: training used 0..2499, the quality study uses 1,000,000 onwards.
SEEDS = [3_000_000 + i for i in range(4)]

pytestmark = pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(),
                                reason="the demo model is not bundled in this checkout")


@pytest.fixture(scope="module")
def demo():
    return resolve("demo")


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
    assert suppressor.config.image_size == 256


def test_demo_beats_the_identity_baseline_on_held_out_phantoms(demo):
    suppressor = Suppressor(demo, device="cpu", batch_size=len(SEEDS))  # the default sampler
    phantoms = [phantom.generate(seed, demo.config.image_size) for seed in SEEDS]
    preds = suppressor.suppress_unit([p.cxr for p in phantoms])
    size = demo.config.image_size  # the phantoms' native resolution
    model = [metrics.evaluate(pred, p.soft, p.cxr, size=size) for pred, p in zip(preds, phantoms)]
    ident = [metrics.evaluate(p.cxr, p.soft, p.cxr, size=size) for p in phantoms]
    psnr_gain = np.mean([m.psnr for m in model]) - np.mean([i.psnr for i in ident])
    bsr_gain = np.mean([m.bsr for m in model]) - np.mean([i.bsr for i in ident])
    bsr_model = np.mean([m.bsr for m in model])
    # Measured with the shipped weights on these 4 seeds (DPM-Solver++ 20 steps, seed 0, 2026-11-24):
    # PSNR 30.24 dB vs 28.10 for the identity (+2.14 dB; every phantom +1.2 dB or more; +3.05 dB on
    # the next 8 seeds; DDIM 20 steps: 30.38 dB, +2.27 dB, BSR 0.706; DDPM 10 steps, the quality
    # study's recommendation: 30.45 dB, +2.34 dB, BSR 0.703).
    # A clear margin, with room for float rounding across CPUs: 1 dB.
    assert psnr_gain > 1.0, f"PSNR gain over the identity {psnr_gain:.2f} dB"
    # BSR is one-sided (only residuals darker than the target count), so the identity scores 0.82
    # without suppressing anything; the demo model measured 0.705 here (-0.117 vs the identity) and
    # does NOT match it: see the model's README. The floor below (measured 0.705) catches a broken
    # model or sampler, e.g. an untrained or unclipped one scores far below 0.
    assert bsr_model > 0.6, f"BSR {bsr_model:.4f} (identity {bsr_model - bsr_gain:.4f})"
