"""Official BS-LDM checkpoints -> a bsldm_fast model directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .. import modeldir
from ..config import PAPER, PRESETS, DiffusionConfig, ModelConfig, preset
from .checkpoint import Weights, read_weights
from .infer import ConvertError, check_modules, check_tensors, infer_unet, infer_vqgan, vqgan_state

logger = logging.getLogger(__name__)


def _image_size(config_unet, config_vqgan, unet: Weights, image_size: int | None) -> tuple[str, int]:
    """A name and the image size: given, else the pickled U-Net's latent size, else a preset's."""
    name = next((n for n, p in PRESETS.items() if p.unet == config_unet and p.vqgan == config_vqgan),
                "converted")
    if image_size is not None:
        return name, image_size
    root = unet.root
    latent = root.state.get("image_size") if root is not None else None
    if isinstance(latent, int) and latent > 0:
        return name, latent * 2 ** len(config_vqgan.channels)
    if name in PRESETS:
        return name, PRESETS[name].image_size
    raise ConvertError(
        "the image size is not stored in state-dict weights and they match no named config; "
        "give it (image_size=..., or --image-size)"
    )


def build_config(unet: Weights, vqgan: Weights, image_size: int | None = None) -> ModelConfig:
    """The ModelConfig the weights describe; the diffusion settings are the paper's."""
    unet_config = infer_unet(unet, PAPER.unet)
    vqgan_config = infer_vqgan(vqgan, PAPER.vqgan)
    name, size = _image_size(unet_config, vqgan_config, unet, image_size)
    try:
        return ModelConfig(
            name=name, image_size=size, vqgan=vqgan_config, unet=unet_config,
            diffusion=DiffusionConfig(latent_channels=vqgan_config.embedding_dim),
        )
    except ValueError as error:
        raise ConvertError(f"the weights describe an unusable model: {error}") from error


def load_checkpoints(unet: str | Path, vqgan: str | Path, config: ModelConfig | str | None = None,
                     image_size: int | None = None, ema: bool | None = None) -> modeldir.Model:
    """Read the two checkpoints safely, infer (or check) the config, and return our model.

    `config` (a ModelConfig or a preset name) is checked against the weights: every tensor must
    be there with the config's shape, and a pickled module's layers must match ours. `ema` picks
    the EMA weights of a U-Net checkpoint dict (None: when present).
    """
    unet_weights = read_weights(unet, ema)
    vqgan_weights = read_weights(vqgan)
    if config is None:
        config = build_config(unet_weights, vqgan_weights, image_size)
    else:
        if isinstance(config, str):
            config = preset(config)
        if image_size is not None:
            config = config.replace(image_size=image_size)
    model_vqgan, model_unet = modeldir.build(config)
    vq_state = vqgan_state(vqgan_weights.state)
    file_names = dict(zip(vq_state, vqgan_weights.state))
    check_tensors(model_vqgan, vq_state, f"VQGAN {vqgan}", config.name, file_names)
    check_tensors(model_unet, unet_weights.state, f"U-Net {unet}", config.name)
    check_modules(vqgan_weights.modules, model_vqgan, f"VQGAN {vqgan}", vqgan=True)
    check_modules(unet_weights.modules, model_unet, f"U-Net {unet}", vqgan=False)
    with torch.no_grad():
        model_vqgan.load_state_dict({k: v.float() for k, v in vq_state.items()})
        model_unet.load_state_dict({k: v.float() for k, v in unet_weights.state.items()})
    logger.info("U-Net from %s, VQGAN from %s, config %s", unet_weights.source, vqgan_weights.source,
                config.name)
    return modeldir.Model(config, model_vqgan.eval(), model_unet.eval(), f"{unet} + {vqgan}")


def convert(unet: str | Path, vqgan: str | Path, output: str | Path,
            config: ModelConfig | str | None = None, image_size: int | None = None,
            ema: bool | None = None, overwrite: bool = False) -> Path:
    """Convert the official BS-LDM checkpoints (or state dicts) into a model directory.

    Nothing in the checkpoints is imported or run (see `unpickler`). Returns the directory, which
    `Suppressor.from_pretrained` loads.
    """
    model = load_checkpoints(unet, vqgan, config, image_size, ema)
    return modeldir.save(output, model.config, model.vqgan, model.unet, overwrite=overwrite)
