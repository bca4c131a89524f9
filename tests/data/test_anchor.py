"""Fitting a model directory's output anchor: the offset is the soft - CXR mean grey level of the
pairs that trained the model, and no other pair may be used."""

import json

import numpy as np
import pytest

from bsldm_fast import modeldir
from bsldm_fast.config import ModelConfig
from bsldm_fast.data import anchor
from bsldm_fast.io import write_image


def _pair_folder(root, names, rng):
    shifts = {}
    for name in names:
        cxr = rng.random((64, 64)) * 0.8 + 0.1
        shift = float(rng.uniform(-0.08, 0.0))
        soft = cxr + shift
        for kind, image in (("cxr", cxr), ("soft", soft)):
            (root / kind).mkdir(parents=True, exist_ok=True)
            write_image(root / kind / f"{name}.png", np.rint(image * 65535).astype(np.uint16))
        shifts[name] = shift
    return shifts


@pytest.fixture
def model_dir(tmp_path):
    model = modeldir.random_model("tiny")
    path = modeldir.save(tmp_path / "model", model.config, model.vqgan, model.unet)
    (path / "training_data.json").write_text(json.dumps({"real_pairs": ["a", "b"]}))
    return path


def test_fit_offset_is_the_mean_soft_minus_cxr():
    rng = np.random.default_rng()
    pairs = [(c, c + s) for c, s in ((rng.random((8, 8)), -0.05), (rng.random((8, 8)), -0.01))]
    assert anchor.fit_offset(pairs) == pytest.approx(-0.03, abs=1e-12)
    with pytest.raises(ValueError):
        anchor.fit_offset([])


def test_cli_writes_the_anchor_fitted_on_the_training_pairs(tmp_path, model_dir):
    shifts = _pair_folder(tmp_path / "pairs", ["a", "b", "c"], np.random.default_rng())
    before = ModelConfig.load(model_dir / "config.json")
    assert anchor.main([str(model_dir), "--pairs", str(tmp_path / "pairs"), "--train", "b,a"]) == 0
    after = ModelConfig.load(model_dir / "config.json")
    assert after.output_anchor.mode == "input"
    # 16-bit PNG rounding and the resize to 1024 px move the mean by far less than 1e-3.
    assert after.output_anchor.offset == pytest.approx((shifts["a"] + shifts["b"]) / 2, abs=1e-3)
    assert after.replace(output_anchor=before.output_anchor) == before  # nothing else changed
    assert modeldir.load(model_dir).config == after


def test_cli_refuses_pairs_the_model_did_not_train_on(tmp_path, model_dir):
    _pair_folder(tmp_path / "pairs", ["a", "b", "c"], np.random.default_rng())
    text = (model_dir / "config.json").read_text()
    with pytest.raises(SystemExit) as stop:
        anchor.main([str(model_dir), "--pairs", str(tmp_path / "pairs"), "--train", "a,c"])
    assert stop.value.code == 2
    assert (model_dir / "config.json").read_text() == text


def test_dry_run_writes_nothing(tmp_path, model_dir, capsys):
    _pair_folder(tmp_path / "pairs", ["a", "b"], np.random.default_rng())
    text = (model_dir / "config.json").read_text()
    anchor.main([str(model_dir), "--pairs", str(tmp_path / "pairs"), "--train", "a,b", "--dry-run"])
    assert '"mode": "input"' in capsys.readouterr().out
    assert (model_dir / "config.json").read_text() == text
