"""Every checkpoint form converts to the same model; configs are inferred, or checked with the
offending tensor named; the command line writes a directory that `Suppressor` loads."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bsldm_fast import PRESETS, Suppressor
from bsldm_fast.cli import main
from bsldm_fast.convert import (CheckpointError, ConvertError, Weights, convert, infer_unet,
                                infer_vqgan, load_checkpoints, read_weights)
from bsldm_fast.models import VQGAN, UNet
from bsldm_fast.modeldir import load

from .conftest import make_unet, make_vqvae


def _monai_names(state: dict) -> dict:
    return {("quantizer.quantizer." + k[len("quantizer."):] if k.startswith("quantizer.") else k): v
            for k, v in state.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_is_inferred_from_tensor_shapes(name):
    """Shapes only (meta tensors): the paper's 383 M-parameter U-Net costs nothing to describe."""
    config = PRESETS[name]
    with torch.device("meta"):
        unet, vqgan = UNet(config.unet), VQGAN(config.vqgan)
    inferred_unet = infer_unet(Weights(unet.state_dict(), "test"), config.unet)
    inferred_vqgan = infer_vqgan(Weights(_monai_names(vqgan.state_dict()), "test"), config.vqgan)
    assert inferred_unet == config.unet
    assert inferred_vqgan == config.vqgan


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_forms_give_the_same_model(originals, converted, tmp_path):
    unet, vqvae, root = originals
    reference = converted
    forms = {
        "sd.pt": unet.state_dict(),
        "ddp.pth": {f"module.{k}": v for k, v in unet.state_dict().items()},
        "ckpt.pth": {"state_dict": unet.state_dict(), "epoch": 3, "optimizer": {"lr": 1e-4}},
        "model.pth": {"model": unet, "step": 10},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in vqvae.state_dict().items()}, tmp_path / "vq.safetensors")
    expected = unet.state_dict()
    for name in forms:
        state = read_weights(tmp_path / name).state
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), name
    model = load_checkpoints(tmp_path / "unet.safetensors", tmp_path / "vq.safetensors",
                             config=reference.config)
    assert _same_weights(model.unet, reference.unet)
    assert _same_weights(model.vqgan, reference.vqgan)


def test_ema_weights_are_preferred_and_selectable(originals, tmp_path):
    unet, _, root = originals
    raw = unet.state_dict()
    ema = {k: v + 1 for k, v in raw.items()}
    torch.save({"state_dict": raw, "ema": ema}, tmp_path / "both.pth")
    torch.save({"state_dict": raw}, tmp_path / "raw.pth")
    assert torch.equal(read_weights(tmp_path / "both.pth").state["out.2.weight"], ema["out.2.weight"])
    assert torch.equal(read_weights(tmp_path / "both.pth", ema=False).state["out.2.weight"], raw["out.2.weight"])
    with pytest.raises(CheckpointError, match="no EMA weights"):
        read_weights(tmp_path / "raw.pth", ema=True)


def test_torch_ema_shadow_parameters_map_onto_the_pickled_model(originals, tmp_path):
    """torch_ema (what BS-LDM trained with) keeps unnamed copies of the trainable parameters."""
    unet, _, root = originals
    shadow = [p.detach() * 2 for p in unet.parameters() if p.requires_grad]
    torch.save({"model": unet, "ema": {"decay": 0.995, "num_updates": 5, "shadow_params": shadow,
                                       "collected_params": None}}, tmp_path / "ckpt.pth")
    weights = read_weights(tmp_path / "ckpt.pth")
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    for name, value in zip(names, shadow):
        assert torch.equal(weights.state[name], value)
    torch.save({"state_dict": unet.state_dict(), "ema": {"shadow_params": shadow}}, tmp_path / "sd.pth")
    with pytest.raises(CheckpointError, match="no names"):
        read_weights(tmp_path / "sd.pth")


def test_config_mismatch_names_the_tensor_and_both_shapes(originals):
    _, _, root = originals
    with pytest.raises(ConvertError) as error:
        load_checkpoints(root / "LDM.pth", root / "VQGAN.pth", config="tiny")
    message = str(error.value)
    assert "config 'tiny'" in message
    assert "tensor quantizer.quantizer.embedding.weight (ours: quantizer.embedding.weight): VQGAN" in message
    assert "has shape (32, 4), config 'tiny' expects (256, 4)" in message
    assert "tensor encoder.blocks.3.conv1.conv.weight" in message and "(24, 32, 3, 3)" in message
    assert "encoder.blocks.0.conv.weight" not in message  # same shape in both


def test_swapped_files_are_named_for_what_they_lack(originals):
    root = originals[2]
    with pytest.raises(ConvertError, match="time_embed.0.weight is missing; these are not U-Net weights"):
        load_checkpoints(root / "VQGAN.pth", root / "LDM.pth")


def test_pickled_layer_hyperparameters_are_checked(originals, tmp_path):
    """A VQVAE with other convolution paddings has the same tensor shapes but is another network."""
    vqvae = make_vqvae(seed=7)
    vqvae.encoder.blocks[1].conv1.conv.padding = (2, 2)
    torch.save(vqvae, tmp_path / "VQGAN.pth")
    with pytest.raises(ConvertError, match=r"encoder\.blocks\.1\.conv1\.conv\.padding"):
        load_checkpoints(originals[2] / "LDM.pth", tmp_path / "VQGAN.pth")


def test_heads_come_from_the_pickle_and_are_checked_against_a_config(originals, converted):
    root = originals[2]
    inferred = converted.config
    assert inferred.unet.num_heads == 2 and inferred.image_size == 64
    wrong = inferred.replace(unet=dataclasses.replace(inferred.unet, num_heads=4))
    with pytest.raises(ConvertError, match="num_heads"):
        load_checkpoints(root / "LDM.pth", root / "VQGAN.pth", config=wrong)


def test_state_dicts_without_a_known_size_need_image_size(originals, tmp_path):
    unet, vqvae, _ = originals
    torch.save(unet.state_dict(), tmp_path / "u.pt")
    torch.save(vqvae.state_dict(), tmp_path / "v.pt")
    with pytest.raises(ConvertError, match="image size"):
        load_checkpoints(tmp_path / "u.pt", tmp_path / "v.pt")
    assert load_checkpoints(tmp_path / "u.pt", tmp_path / "v.pt", image_size=64).config.image_size == 64


def test_cli_convert_writes_a_model_suppressor_loads(originals, converted, tmp_path, capsys):
    unet, vqvae, root = originals
    out = tmp_path / "model"
    assert main(["convert", "--unet", str(root / "LDM.pth"), "--vqgan", str(root / "VQGAN.pth"),
                 "-o", str(out)]) == 0
    model = load(out)
    assert _same_weights(model.unet, converted.unet) and _same_weights(model.vqgan, converted.vqgan)
    s = Suppressor.from_pretrained(out, device="cpu", sampler="ddim", steps=2)
    image = (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8)
    assert s(image).shape == image.shape
    # An existing model is never overwritten without --overwrite.
    assert main(["convert", "--unet", str(root / "LDM.pth"), "--vqgan", str(root / "VQGAN.pth"),
                 "-o", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_reports_unsafe_files_without_a_traceback(tmp_path, capsys):
    from .test_convert_unpickler import SystemPayload

    marker = tmp_path / "ran"
    torch.save({"model": SystemPayload(f"touch {marker}")}, tmp_path / "evil.pth")
    assert main(["convert", "--unet", str(tmp_path / "evil.pth"), "--vqgan", str(tmp_path / "evil.pth"),
                 "-o", str(tmp_path / "out")]) == 2
    assert "posix.system" in capsys.readouterr().err or not hasattr(__import__("os"), "posix")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_function_returns_the_directory(originals, converted, tmp_path):
    _, _, root = originals
    path = convert(root / "LDM.pth", root / "VQGAN.pth", tmp_path / "m")
    assert path == tmp_path / "m" and load(path).config == converted.config
