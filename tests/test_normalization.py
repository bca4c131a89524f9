"""Input normalisation: the affine map and its inverse, and the property it buys, a Suppressor whose
output follows a linear change of the input's display scale."""

import dataclasses

import numpy as np
import pytest
import torch

from bsldm_fast import Suppressor, modeldir, normalization
from bsldm_fast.config import InputNormalization, ModelConfig, OutputAnchor, preset


def test_none_is_the_identity():
    image = torch.rand(1, 1, 32, 32)
    assert normalization.affine(image, InputNormalization()) == (1.0, 0.0)


def test_percentile_lands_the_percentiles_and_inverts():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 64, 64, generator=g) * 0.5 + 0.2
    norm = InputNormalization("percentile", 2.0, 98.0, 0.1, 0.9)
    scale, offset = normalization.affine(image, norm)
    mapped = image * scale + offset
    low, high = torch.quantile(mapped.flatten(), torch.tensor([0.02, 0.98])).tolist()
    assert low == pytest.approx(0.1, abs=1e-5) and high == pytest.approx(0.9, abs=1e-5)
    torch.testing.assert_close(normalization.invert(mapped, scale, offset), image, atol=1e-6, rtol=0)


def test_flat_image_is_left_alone():
    norm = InputNormalization("percentile")
    assert normalization.affine(torch.full((1, 1, 16, 16), 0.4), norm) == (1.0, 0.0)


def test_bad_settings_are_refused():
    base = preset("tiny").to_dict()
    for bad in ({"mode": "zscore"}, {"low_percentile": 99.0, "high_percentile": 1.0},
                {"low_value": 0.9, "high_value": 0.1}, {"high_percentile": 150.0}):
        data = dict(base, input_normalization={**InputNormalization().__dict__, **bad})
        with pytest.raises(ValueError, match="input_normalization"):
            ModelConfig.from_dict(data)


def test_old_config_files_default_to_none():
    data = preset("tiny").to_dict()
    del data["input_normalization"]
    assert ModelConfig.from_dict(data).input_normalization.mode == "none"


def test_percentile_model_follows_a_linear_change_of_the_display_scale():
    """With 'percentile', a + b * x goes into the model exactly as x does, so the output is a + b *
    (the output for x): a scanner's window/level no longer changes what the model sees."""
    model = modeldir.random_model("tiny", seed=1)
    config = dataclasses.replace(model.config, input_normalization=InputNormalization("percentile"))
    model = dataclasses.replace(model, config=config)
    s = Suppressor(model, device="cpu", seed=3, steps=3)
    rng = np.random.default_rng(0)
    x = np.clip(rng.normal(0.5, 0.12, (model.config.image_size,) * 2), 0, 1).astype(np.float32)
    a, b = 0.1, 0.6
    y = s.suppress_unit([x])[0]
    y2 = s.suppress_unit([a + b * x])[0]
    inside = (y > 0.01) & (y < 0.99)  # the final clip to [0, 1] is not affine
    assert inside.mean() > 0.2
    np.testing.assert_allclose(y2[inside], (a + b * y)[inside], atol=2e-4)
    # Without normalisation the same change gives another image: the test can tell them apart.
    plain = Suppressor(modeldir.random_model("tiny", seed=1), device="cpu", seed=3, steps=3)
    z, z2 = plain.suppress_unit([x])[0], plain.suppress_unit([a + b * x])[0]
    assert np.abs(z2 - (a + b * z))[inside].max() > 1e-2


# The output anchor ------------------------------------------------------------------------------

def _low_pass_numpy(image: np.ndarray, sigma: float) -> np.ndarray:
    """Float64 reference: the Gaussian written out, edges mirrored as numpy's 'reflect' does."""
    radius = int(np.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image, radius, mode="reflect")
    rows = np.stack([np.convolve(r, kernel, mode="valid") for r in padded])
    return np.stack([np.convolve(c, kernel, mode="valid") for c in rows.T]).T


@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.5])
def test_low_pass_matches_the_written_out_gaussian(sigma):
    image = np.random.default_rng().random((2, 1, 40, 56))
    got = normalization.low_pass(torch.from_numpy(image), sigma).numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b, 0], _low_pass_numpy(image[b, 0], sigma), atol=1e-12, rtol=0)


def test_anchor_none_returns_the_output_itself():
    soft, image = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    assert normalization.anchor(soft, image, OutputAnchor()) is soft


def test_anchor_takes_the_low_frequencies_from_the_input_and_keeps_the_rest():
    """A model output = input + a wrong global level + fine detail comes out as input + the
    anchor's offset + the same fine detail: the level is replaced, the detail kept."""
    g = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    image = torch.rand(1, 1, 128, 128, generator=g, dtype=torch.float64)
    detail = 0.1 * (torch.arange(128)[:, None] + torch.arange(128)[None, :]).remainder(2) - 0.05
    soft = image + 0.17 + detail.to(torch.float64)
    spec = OutputAnchor("input", sigma=1 / 32, offset=-0.04)  # 4 px at 128 px
    out = normalization.anchor(soft, image, spec)
    torch.testing.assert_close(out, image - 0.04 + detail, atol=1e-3, rtol=0)
    assert (soft - (image - 0.04 + detail)).abs().min() > 0.2  # the test can tell them apart


def test_anchored_suppressor_keeps_the_input_level():
    """End to end: an untrained model's output level is arbitrary; anchored, the output's mean is
    the input's plus the offset (to the mirrored edges' rounding)."""
    model = modeldir.random_model("tiny", seed=2)
    rng = np.random.default_rng()
    x = np.clip(rng.normal(0.5, 0.1, (model.config.image_size,) * 2), 0.05, 0.95).astype(np.float32)
    plain = Suppressor(model, device="cpu", seed=1, steps=3).suppress_unit([x])[0]
    spec = OutputAnchor("input", offset=-0.03)
    anchored_model = dataclasses.replace(model, config=model.config.replace(output_anchor=spec))
    out = Suppressor(anchored_model, device="cpu", seed=1, steps=3).suppress_unit([x])[0]
    assert abs(out.mean() - (x.mean() - 0.03)) < 2e-3
    assert abs(plain.mean() - (x.mean() - 0.03)) > 1e-2  # unanchored it is elsewhere


def test_bad_anchor_settings_are_refused_and_old_files_default_to_none():
    base = preset("tiny").to_dict()
    for bad in ({"mode": "lowpass"}, {"sigma": 0.0}, {"sigma": 2.0}, {"offset": 3.0}):
        data = dict(base, output_anchor={**OutputAnchor().__dict__, **bad})
        with pytest.raises(ValueError, match="output_anchor"):
            ModelConfig.from_dict(data)
    del base["output_anchor"]
    assert ModelConfig.from_dict(base).output_anchor.mode == "none"
