"""Input normalisation: the affine map and its inverse, and the property it buys, a Suppressor whose
output follows a linear change of the input's display scale."""

import dataclasses

import numpy as np
import pytest
import torch

from bsldm_fast import Suppressor, modeldir, normalization
from bsldm_fast.config import InputNormalization, ModelConfig, preset


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
