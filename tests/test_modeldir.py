import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bsldm_fast import Suppressor
from bsldm_fast.modeldir import ModelDirError, load, random_model, save


def test_round_trip_gives_the_same_networks(tmp_path, gen):
    model = random_model("tiny", seed=5)
    save(tmp_path / "m", model.config, model.vqgan, model.unet)
    again = load(tmp_path / "m")
    assert again.config == model.config
    x = torch.rand(2, 1, 64, 64, generator=gen) * 2 - 1
    u = torch.randn(2, 8, 8, 8, generator=gen)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(again.vqgan(x), model.vqgan(x))
        assert torch.equal(again.unet(u, t), model.unet(u, t))


def test_from_pretrained_loads_a_directory(tmp_path):
    model = random_model("tiny", seed=2)
    save(tmp_path, model.config, model.vqgan, model.unet)
    image = np.random.default_rng().integers(0, 256, (70, 70), dtype=np.uint8)
    a = Suppressor.from_pretrained(tmp_path, device="cpu", steps=3)(image)
    b = Suppressor(model, device="cpu", steps=3)(image)
    assert np.array_equal(a, b)


def test_refuses_to_overwrite(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    with pytest.raises(ModelDirError, match="refusing to overwrite"):
        save(tmp_path, model.config, model.vqgan, model.unet)
    save(tmp_path, model.config, model.vqgan, model.unet, overwrite=True)


def test_missing_pieces_are_named(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load(tmp_path / "nowhere")
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    (tmp_path / "unet.safetensors").unlink()
    with pytest.raises(ModelDirError, match="unet.safetensors is missing"):
        load(tmp_path)


def test_mismatches_name_the_tensor_and_both_shapes(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    path = tmp_path / "unet.safetensors"
    state = load_file(str(path))
    state["out.2.weight"] = torch.zeros(5, 32, 3, 3)
    del state["time_embed.0.bias"]
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(path))
    with pytest.raises(ModelDirError) as error:
        load(tmp_path)
    message = str(error.value)
    assert "out.2.weight: file (5, 32, 3, 3) vs config (4, 32, 3, 3)" in message
    assert "time_embed.0.bias" in message and "extra.weight" in message


def test_config_errors_point_at_the_file(tmp_path):
    model = random_model("tiny")
    save(tmp_path, model.config, model.vqgan, model.unet)
    data = json.loads((tmp_path / "config.json").read_text())
    data["unet"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ModelDirError, match="config.json.*bogus"):
        load(tmp_path)


def test_random_models_have_no_zero_layers():
    model = random_model("tiny", seed=1)
    for name, p in model.unet.named_parameters():
        assert p.abs().sum() > 0, name
