"""Training options: defaults < file < command line, checked, and the perceptual-weights rule."""

from __future__ import annotations

import json

import pytest

from bsldm_fast.training.config import PERCEPTUAL_ENV, make_config


def test_file_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nmilestones: [1, 2]\nlr: 3.0e-4\naugment: true\n")
    c = make_config("ldm", tmp_path / "c.yaml", {"data": "d", "vqgan": "v", "lr": 1e-3, "epochs": None})
    assert (c.epochs, c.milestones, c.lr, c.augment) == (7, (1, 2), 1e-3, True)
    assert c.batch_size == 4 and c.ema_decay == 0.995  # stage defaults filled in
    (tmp_path / "c.json").write_text(json.dumps({"batch-size": 3}))
    assert make_config("vqgan", tmp_path / "c.json", {"data": "d", "perceptual": False}).batch_size == 3


def test_stage_defaults_are_the_papers():
    v = make_config("vqgan", overrides={"data": "d", "perceptual_weights": "w"})
    l = make_config("ldm", overrides={"data": "d", "vqgan": "v"})
    assert (v.lr, v.lr_d, v.perceptual_weight, v.adv_weight, v.milestones) == (1e-4, 5e-4, 0.001, 0.01, ())
    assert (l.lr, l.milestones, l.gamma, l.condition_scaling) == (2e-4, (200, 400, 750, 1500), 0.1, "none")


def test_rejects_unknown_and_bad_values(tmp_path):
    (tmp_path / "c.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown training option 'epoch'"):
        make_config("vqgan", tmp_path / "c.yaml", {"data": "d", "perceptual": False})
    with pytest.raises(ValueError, match="condition_scaling"):
        make_config("ldm", overrides={"data": "d", "vqgan": "v", "condition_scaling": "half"})
    with pytest.raises(ValueError, match="--vqgan"):
        make_config("ldm", overrides={"data": "d"})


def test_perceptual_weights_required_unless_turned_off(monkeypatch):
    monkeypatch.delenv(PERCEPTUAL_ENV, raising=False)
    with pytest.raises(ValueError, match="--no-perceptual"):
        make_config("vqgan", overrides={"data": "d"})
    assert not make_config("vqgan", overrides={"data": "d", "perceptual": False}).perceptual
    monkeypatch.setenv(PERCEPTUAL_ENV, "/weights/lpips.safetensors")
    assert make_config("vqgan", overrides={"data": "d"}).perceptual_weights == "/weights/lpips.safetensors"
