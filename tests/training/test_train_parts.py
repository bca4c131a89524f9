"""LPIPS-VGG loading, the weight EMA and pickle-free checkpoints."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bsldm_fast.training import checkpoint
from bsldm_fast.training.ema import EMA
from bsldm_fast.training.perceptual import LPIPS, PerceptualWeightsError, load_lpips


def test_lpips_is_a_distance_and_loads_both_namings(tmp_path, gen):
    model = load_lpips("random")
    x = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    y = torch.rand(2, 1, 16, 16, generator=gen) * 2 - 1
    assert torch.all(model(x, x) == 0) and torch.all(model(x, y) > 0)
    torch.testing.assert_close(model(x, y), model(y, x))
    # LPIPS's own state dict in one file ...
    lpips_file = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(lpips_file))
    # ... or torchvision's vgg16 `features.N.*` plus LPIPS's linear heads in two (.pth) files.
    vgg, lins = {}, {}
    slices = {1: 0, 2: 4, 3: 9, 4: 16, 5: 23}
    for key, value in model.state_dict().items():
        if key.startswith("net.slice"):
            k, index, rest = key.split(".", 3)[1:]
            assert int(index) >= slices[int(k[5:])]
            vgg[f"features.{index}.{rest}"] = value
        else:
            lins[key] = value
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    torch.save(vgg, tmp_path / "vgg16.pth")
    torch.save(lins, tmp_path / "vgg.pth")
    for spec in (str(lpips_file), f"{tmp_path / 'vgg16.pth'}:{tmp_path / 'vgg.pth'}"):
        torch.testing.assert_close(load_lpips(spec)(x, y), model(x, y), rtol=0, atol=0)


def test_lpips_refuses_missing_or_incomplete_weights(tmp_path):
    with pytest.raises(PerceptualWeightsError, match="does not exist"):
        load_lpips(str(tmp_path / "nope.pth"))
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "part.pth")
    with pytest.raises(PerceptualWeightsError, match="incomplete"):
        load_lpips(str(tmp_path / "part.pth"))


def test_lpips_stays_frozen_in_eval_mode():
    model = LPIPS().train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_ema_follows_torch_ema(gen):
    module = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in module.parameters()]
    ema = EMA(module, decay=0.995)
    expected = [s.clone() for s in start]
    for n in range(1, 4):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update(module)
        # torch_ema with use_num_updates: decay_n = min(decay, (1 + n) / (10 + n))
        d = min(0.995, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, module.parameters())]
    for s, e in zip(ema.shadow, expected):
        torch.testing.assert_close(s, e)
    copy = torch.nn.Linear(3, 2)
    ema.copy_to(copy)
    torch.testing.assert_close(copy.weight, expected[0])


def test_checkpoint_round_trip_is_exact(tmp_path, gen):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, generator=gen)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 2, 5], gamma=0.1)
    state = {"opt": opt.state_dict(), "sched": sched.state_dict(), "rng": checkpoint.rng_state(),
             "counter": collections.Counter({3: 2}), "tuple": (1, 2.5, "x", None), "arr": np.arange(3, dtype=np.uint32)}
    checkpoint.save(tmp_path, "step-00000001", state)
    loaded = checkpoint.load(checkpoint.latest(tmp_path))
    assert loaded["opt"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"].items():  # integer keys survive
        for name, t in v.items():
            assert torch.equal(loaded["opt"]["state"][k][name], t)
    assert loaded["sched"]["milestones"] == collections.Counter({2: 2, 5: 1})
    assert loaded["tuple"] == (1, 2.5, "x", None) and loaded["arr"].dtype == np.uint32
    # RNG states restore exactly.
    torch.manual_seed(1)
    rng = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(), __import__("random").random())
    checkpoint.save(tmp_path, "step-00000002", {"rng": rng}, keep=1)
    checkpoint.set_rng_state(checkpoint.load(checkpoint.latest(tmp_path))["rng"])
    b = (torch.rand(3), np.random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    # keep=1 pruned the older checkpoint; no temporary folders remain; no pickles anywhere.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]
    assert {p.suffix for p in (tmp_path / "step-00000002").iterdir()} == {".json", ".safetensors"}


def test_latest_survives_a_lost_pointer_and_resaves_keep_the_old_copy(tmp_path):
    checkpoint.save(tmp_path, "step-00000001", {"x": torch.zeros(2)})
    checkpoint.save(tmp_path, "step-00000003", {"x": torch.ones(2)})
    (tmp_path / "latest").unlink()
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000003"
    (tmp_path / "step-00000003" / "state.safetensors").unlink()  # an incomplete folder is passed over
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000001"
    checkpoint.save(tmp_path, "step-00000001", {"x": torch.full((2,), 7.0)})  # saved again
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path))["x"], torch.full((2,), 7.0))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint"):
        checkpoint.load(tmp_path / "nowhere")
