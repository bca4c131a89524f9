"""The model directory: `config.json` + `vqgan.safetensors` + `unet.safetensors`.

It is the only thing that travels between training, conversion, export and inference. Weights are
safetensors (no pickles); loading checks every name and shape and says exactly what does not match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._files import atomic_write
from .config import ModelConfig, preset
from .models import VQGAN, UNet

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
VQGAN_FILE = "vqgan.safetensors"
UNET_FILE = "unet.safetensors"


class ModelDirError(ValueError):
    """A model directory is missing, incomplete, or does not match its config."""


@dataclass
class Model:
    """A BS-LDM model in memory: its config and its two networks (on the CPU, float32, eval mode)."""

    config: ModelConfig
    vqgan: VQGAN
    unet: UNet
    source: str
    """Where it came from: a directory, or 'random:<config>' for an untrained model."""

    @property
    def is_random(self) -> bool:
        return self.source.startswith("random:")


def build(config: ModelConfig) -> tuple[VQGAN, UNet]:
    """Freshly initialised networks for a config (guided-diffusion's init: zeroed output layers)."""
    return VQGAN(config.vqgan).eval(), UNet(config.unet).eval()


def random_model(config: ModelConfig | str = "tiny", seed: int = 0) -> Model:
    """An untrained model with every weight random and non-zero: for demos, tests and benchmarks.

    The zero-initialised output layers of a fresh U-Net would make every noise estimate 0, so all
    parameters are redrawn at a scale that keeps activations O(1).
    """
    if isinstance(config, str):
        config = preset(config)
    generator = torch.Generator().manual_seed(seed)
    vqgan, unet = build(config)
    with torch.no_grad():
        for module in (vqgan, unet):
            for name, param in module.named_parameters():
                fan_in = param[0].numel() if param.dim() > 1 else 1
                scale = 1.0 / fan_in**0.5 if param.dim() > 1 else 0.05
                if name.endswith("norm.weight") or ".in_layers.0." in name or ".out_layers.0." in name:
                    param.copy_(1.0 + 0.05 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(scale * torch.randn(param.shape, generator=generator))
        vqgan.quantizer.ema_w.copy_(vqgan.quantizer.embedding.weight)
    return Model(config, vqgan, unet, f"random:{config.name}")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(model_dir: str | Path, config: ModelConfig, vqgan: VQGAN, unet: UNet,
         overwrite: bool = False) -> Path:
    """Write a model directory; each file is written to a temporary name and renamed into place."""
    path = Path(model_dir)
    existing = [n for n in (CONFIG_FILE, VQGAN_FILE, UNET_FILE) if (path / n).exists()]
    if existing and not overwrite:
        raise ModelDirError(f"{path} already holds {existing}; refusing to overwrite a model")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "bsldm_fast", "config_version": str(config.version)}
    atomic_write(path / VQGAN_FILE, lambda f: save_file(_state(vqgan), f, metadata=meta))
    atomic_write(path / UNET_FILE, lambda f: save_file(_state(unet), f, metadata=meta))
    atomic_write(path / CONFIG_FILE, lambda f: Path(f).write_text(config.to_json()))
    return path


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise ModelDirError listing every missing, unexpected and mis-shaped tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_preview(mismatched)}")
    if problems:
        raise ModelDirError(f"{what} does not match its config.json; " + "; ".join(problems))


def _preview(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def load(model_dir: str | Path) -> Model:
    """Load a model directory onto the CPU in float32, checking names and shapes."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelDirError(f"model directory {path} does not exist")
    for name in (CONFIG_FILE, VQGAN_FILE, UNET_FILE):
        if not (path / name).is_file():
            raise ModelDirError(
                f"{path} is not a bsldm_fast model directory: {name} is missing "
                f"(expected {CONFIG_FILE}, {VQGAN_FILE}, {UNET_FILE})"
            )
    try:
        config = ModelConfig.load(path / CONFIG_FILE)
    except (ValueError, TypeError) as error:
        raise ModelDirError(f"{path / CONFIG_FILE}: {error}") from error
    vqgan, unet = build(config)
    for module, name in ((vqgan, VQGAN_FILE), (unet, UNET_FILE)):
        state = load_file(str(path / name))
        check_state_dict(module, state, str(path / name))
        module.load_state_dict({k: v.float() for k, v in state.items()})
    logger.info("loaded %s (%s, %d px)", path, config.name, config.image_size)
    return Model(config, vqgan, unet, str(path))


DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"
"""The bundled demonstration model (trained on synthetic phantoms; see its README.md)."""


def resolve(spec: str | Path) -> Model:
    """A model from a directory, 'demo' (the bundled phantom-trained demo) or an untrained one from
    'random:<config>' (e.g. 'random:tiny')."""
    text = str(spec)
    if text.startswith("random:"):
        return random_model(text.split(":", 1)[1])
    # A directory named 'demo' in the working directory wins: the user's data comes first.
    if text == DEMO_NAME and not Path(text).is_dir():
        return load(DEMO_DIR)
    return load(text)
