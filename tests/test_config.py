import dataclasses
import json

import pytest

from bsldm_fast.config import PAPER, PRESETS, ModelConfig, UNetConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name):
    config = preset(name)
    again = ModelConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.unet.channel_mult, tuple)


def test_paper_is_the_published_model():
    v, u, d = PAPER.vqgan, PAPER.unet, PAPER.diffusion
    assert (PAPER.image_size, PAPER.latent_size) == (1024, 128)
    assert v.channels == (128, 256, 512) and v.res_channels == (512,) * 3 and v.num_res_layers == 2
    assert (v.num_embeddings, v.embedding_dim) == (256, 4)
    assert u.model_channels == 128 and u.channel_mult == (1, 1, 2, 2, 4, 4)
    assert u.num_res_blocks == 8 and set(u.attention_resolutions) == {8, 16, 32} and u.num_heads == 8
    assert u.use_scale_shift_norm and u.resblock_updown and u.in_channels == 8
    assert d.num_train_timesteps == 1000 and d.beta_schedule == "squaredcos_cap_v2"
    assert (d.offset_noise_coefficient, d.clip_range_start, d.clip_range_rate) == (0.1, 1.4, 0.003)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER.image_size = 512  # type: ignore[misc]


def test_unknown_keys_are_named():
    data = json.loads(PAPER.to_json())
    data["unet"]["num_res_blockz"] = 3
    with pytest.raises(ValueError, match="num_res_blockz"):
        ModelConfig.from_dict(data)


def test_newer_format_is_refused():
    data = json.loads(PAPER.to_json())
    data["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image_size": 1020}, "divisible"),
        ({"image_size": 1000}, "halved"),
        ({"unet": UNetConfig(model_channels=100)}, "GroupNorm"),
        ({"unet": UNetConfig(in_channels=6)}, "in_channels"),
    ],
)
def test_invalid_configs_say_why(change, message):
    with pytest.raises(ValueError, match=message):
        PAPER.replace(**change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge")
