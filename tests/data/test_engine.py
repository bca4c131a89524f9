"""The data engine: the display model inverts, the tone map fits, the composition reproduces a real
pair when nothing is changed, draws are keyed by (seed, index), and datasets complete on rerun."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bsldm_fast.data import engine
from bsldm_fast.io import read_image
from bsldm_fast.training.data import random_crop

SAMPLES = Path(__file__).resolve().parents[2] / "assets" / "szch_samples"
STILL = engine.EngineConfig(max_rotate=0.0, max_scale=0.0, max_translate=0.0, elastic=0.0,
                            p_devices=0.0, p_collimation=0.0, p_gamma=0.0, p_blur=0.0, p_noise=0.0)


def _pairs(size=64, count=2, seed=0):
    """Smooth random 'pairs': soft tissue, and a CXR that is a brighter copy plus a bar (a bone)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        soft = torch.nn.functional.interpolate(torch.rand(1, 1, 8, 8, dtype=torch.float64), size=(size, size),
                                               mode="bicubic", align_corners=False)[0, 0].numpy()
        soft = np.clip(0.2 + 0.6 * soft, 0, 1)
        cxr = np.clip(soft ** 0.9, 0, 1)
        cxr[:, size // 3 : size // 3 + 3] += 0.1 * rng.uniform(0.5, 1.0)
        pairs.append((np.clip(cxr, 0, 1), soft))
    return pairs


def test_display_model_inverts():
    d = np.random.default_rng(1).uniform(0, 1, 1000)
    np.testing.assert_allclose(engine.to_display(engine.to_line_integral(d)), d, atol=1e-6)
    assert np.all(np.diff(engine.to_display(np.linspace(0, 3.6, 100))) > 0), "g must be increasing"


def test_tone_map_matches_quantiles_and_is_monotone():
    rng = np.random.default_rng(2)
    source, target = rng.uniform(0, 1, 10000), rng.uniform(0, 1, 10000) ** 2
    m = engine.ToneMap.fit([source], [target])
    mapped = m(source)
    q = np.linspace(0.05, 0.95, 10)
    np.testing.assert_allclose(np.quantile(mapped, q), np.quantile(target, q), atol=0.01)
    assert np.all(np.diff(m(np.linspace(0, 1, 500))) >= 0)


def test_real_source_without_changes_returns_the_real_pair():
    pairs = _pairs()
    e = engine.Engine(pairs, replace(STILL, p_real=1.0, p_transplant=0.0, p_phantom=0.0), size=64)
    cxr, soft, kind = e.pair(0)
    assert kind == "real"
    j = [i for i, (c, _) in enumerate(pairs) if np.allclose(c, cxr, atol=1e-4)]
    assert j, "an unwarped real draw must reproduce one of the real CXRs"
    np.testing.assert_allclose(soft, pairs[j[0]][1], atol=1e-5)


def test_transplant_adds_bone_where_the_source_had_bone_and_keeps_the_soft_target():
    pairs = _pairs(count=1)
    e = engine.Engine(pairs, replace(STILL, p_real=0.0, p_transplant=1.0, p_phantom=0.0,
                                     bone_scale=(1.0, 1.0)), size=64)
    cxr, soft, kind = e.pair(3)
    assert kind == "transplant"
    np.testing.assert_allclose(soft, pairs[0][1], atol=1e-5)
    # Same pair, no warp, bone scale 1: the composition must give the real CXR back.
    np.testing.assert_allclose(cxr, pairs[0][0], atol=1e-3)


def test_phantom_bones_land_on_real_soft_tissue():
    pairs = _pairs(count=1)
    e = engine.Engine(pairs, replace(STILL, p_real=0.0, p_transplant=0.0, p_phantom=1.0), size=64)
    cxr, soft, kind = e.pair(5)
    assert kind == "phantom"
    np.testing.assert_allclose(soft, pairs[0][1], atol=1e-5)
    tone_mapped = e.tone_map(pairs[0][1])
    # Bones only add attenuation: the CXR is nowhere darker than the tone-mapped soft tissue.
    assert (cxr - tone_mapped).min() > -1e-3
    assert (cxr - tone_mapped).max() > 0.05


def test_draws_are_keyed_by_seed_and_index():
    pairs = _pairs()
    a, b = engine.Engine(pairs, seed=3, size=64), engine.Engine(pairs, seed=3, size=64)
    for i in range(4):
        for x, y in zip(a.pair(i)[:2], b.pair(i)[:2]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.pair(0)[0], a.pair(1)[0])
    assert not np.array_equal(a.pair(0)[0], engine.Engine(pairs, seed=4, size=64).pair(0)[0])
    for x in a.pair(2)[:2]:
        assert x.dtype == np.float32 and x.shape == (64, 64) and 0 <= x.min() and x.max() <= 1


def test_every_source_is_drawn_with_its_share():
    e = engine.Engine(_pairs(), size=64)
    kinds = [e.source(i) for i in range(2000)]
    for kind, share in (("real", 0.3), ("transplant", 0.4), ("phantom", 0.3)):
        assert abs(kinds.count(kind) / len(kinds) - share) < 0.04


def test_write_dataset_layout_and_rerun_keeps_existing(tmp_path):
    e = engine.Engine(_pairs(), size=48)
    counts = engine.write_dataset(e, tmp_path, count=3, progress=False)
    assert sum(counts.values()) == 3
    names = sorted(p.name for p in (tmp_path / "CXR").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "BS").iterdir()) == [f"{i:06d}.png" for i in range(3)]
    image = read_image(tmp_path / "CXR" / names[0])
    assert image.dtype == np.uint16 and image.shape == (48, 48)
    before = (tmp_path / "CXR" / names[0]).stat().st_mtime_ns
    engine.write_dataset(e, tmp_path, count=4, progress=False)
    assert (tmp_path / "CXR" / names[0]).stat().st_mtime_ns == before
    assert (tmp_path / "CXR" / "000003.png").exists()


def test_cli_writes_pairs_from_real_samples(tmp_path):
    if not (SAMPLES / "cxr" / "0.png").exists():
        pytest.skip("bundled SZCH samples missing")
    assert engine.main(["--pairs", str(SAMPLES), "--train", "0", "--out", str(tmp_path),
                        "--count", "2", "--size", "64"]) == 0
    assert len(list((tmp_path / "CXR").iterdir())) == 2
    assert (tmp_path / "engine.json").exists()


def test_random_crop_takes_one_window_for_the_whole_stack():
    stack = torch.arange(2 * 16 * 16, dtype=torch.float32).view(2, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    crop = random_crop(stack, 5, g)
    assert crop.shape == (2, 1, 5, 5)
    np.testing.assert_array_equal(crop[1].numpy() - crop[0].numpy(), 256.0)
