"""The model directory: `config.json` + `vqgan.safetensors` + `unet.safetensors`.

It is the only thing that travels between training, conversion, export and inference. Weights are
safetensors (no pickles); loading checks every name and shape and says exactly what does not match.

A model directory may come from anyone, so `load` trusts nothing in it: the files must be regular
files of bounded size, config.json is validated field by field and the model's size estimated
before anything is built (`config.validate`), and each safetensors header is checked against the
file's size and the config's tensor names and shapes before a byte of weights is read. Every
failure is a `ModelDirError` naming the file and the field.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._files import atomic_write
from .config import ModelConfig, preset, state_shapes
from .io.formats import describe_path
from .models import VQGAN, UNet

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
VQGAN_FILE = "vqgan.safetensors"
UNET_FILE = "unet.safetensors"

MAX_CONFIG_BYTES = 1024**2
"""Largest config.json read (a real one is about 2 kB)."""
MAX_HEADER_BYTES = 16 * 1024**2
"""Largest safetensors header read (the paper U-Net's is about 80 kB)."""
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


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
    check_shapes({k: tuple(v.shape) for k, v in module.state_dict().items()},
                 {k: tuple(v.shape) for k, v in state.items()}, what)


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                 what: str) -> None:
    """Raise ModelDirError listing every missing, unexpected and mis-shaped tensor name."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k}: file {tuple(found[k])} vs config {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
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


def _regular(path: Path, what: str) -> os.stat_result:
    """stat of a regular file, or ModelDirError saying what the path is instead."""
    try:
        info = os.stat(path)
    except OSError:
        info = None
    if info is None or not stat.S_ISREG(info.st_mode):
        raise ModelDirError(f"{path}: {what} is {describe_path(path)}, not a regular file")
    return info


def _load_config(path: Path) -> ModelConfig:
    size = _regular(path, "the model config").st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelDirError(f"{path}: {size} bytes; a model config is at most "
                            f"{MAX_CONFIG_BYTES} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ModelDirError(f"{path}: not UTF-8 text ({error})") from error
    except OSError as error:
        raise ModelDirError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        return ModelConfig.from_json(text)
    except (ValueError, TypeError, RecursionError) as error:
        raise ModelDirError(f"{path}: {error}") from error


def read_header(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors a safetensors file declares, {name: (dtype, shape)}, after checking the header
    against the file: its length, JSON, float dtypes, shapes and byte ranges inside the data."""
    path = Path(path)
    size = _regular(path, "the weights file").st_size
    if size < 8:
        raise ModelDirError(f"{path}: {size} bytes, too short for a safetensors file")
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ModelDirError(f"{path}: safetensors header length {length} exceeds the "
                                    f"file's {size} bytes (truncated or not safetensors)")
            if length > MAX_HEADER_BYTES:
                raise ModelDirError(f"{path}: safetensors header of {length} bytes (at most "
                                    f"{MAX_HEADER_BYTES})")
            raw = handle.read(length)
    except OSError as error:
        raise ModelDirError(f"{path}: cannot read ({error.strerror or error})") from error
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ModelDirError(f"{path}: the safetensors header is not valid JSON "
                            f"({type(error).__name__})") from error
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    tensors, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r:.80}"
        if not isinstance(entry, dict):
            raise ModelDirError(f"{where}: its header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _FLOAT_DTYPES:
            raise ModelDirError(f"{where}: dtype {dtype!r:.40} (expected one of "
                                f"{sorted(_FLOAT_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**40
                           for n in shape)):
            raise ModelDirError(f"{where}: shape {shape!r:.80} is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ModelDirError(f"{where}: data_offsets {offsets!r:.80} outside the file's "
                                f"{data_bytes} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _FLOAT_DTYPES[dtype]:
            raise ModelDirError(f"{where}: {offsets[1] - offsets[0]} bytes for a {dtype} tensor "
                                f"of shape {tuple(shape)}")
        tensors[name] = (dtype, tuple(shape))
        ranges.append((offsets[0], offsets[1], name))
    ranges.sort()
    for (_, end, first), (begin, _, second) in zip(ranges, ranges[1:]):
        if begin < end:
            raise ModelDirError(f"{path}: tensors {first!r:.80} and {second!r:.80} overlap")
    return tensors


def load(model_dir: str | Path) -> Model:
    """Load a model directory onto the CPU in float32, checking everything before allocating."""
    path = Path(model_dir)
    if not path.is_dir():
        what = describe_path(path)
        raise ModelDirError(f"model directory {path} does not exist" if what == "missing"
                            else f"model directory {path} is {what}, not a folder")
    for name in (CONFIG_FILE, VQGAN_FILE, UNET_FILE):
        if not os.path.lexists(path / name):
            raise ModelDirError(
                f"{path} is not a bsldm_fast model directory: {name} is missing "
                f"(expected {CONFIG_FILE}, {VQGAN_FILE}, {UNET_FILE})"
            )
    config = _load_config(path / CONFIG_FILE)
    shapes = state_shapes(config)
    for part, name in (("vqgan", VQGAN_FILE), ("unet", UNET_FILE)):
        header = read_header(path / name)
        check_shapes(shapes[part], {k: shape for k, (_, shape) in header.items()},
                     str(path / name))
    # Only now, with every size known to be within the limits and to match the files, is memory
    # allocated.
    vqgan, unet = build(config)
    for module, name in ((vqgan, VQGAN_FILE), (unet, UNET_FILE)):
        try:
            state = load_file(str(path / name))
        except (SafetensorError, OSError) as error:
            raise ModelDirError(f"{path / name}: cannot read the weights ({error})") from error
        check_state_dict(module, state, str(path / name))
        module.load_state_dict({k: v.float() for k, v in state.items()})
    logger.info("loaded %s (%s, %d px)", path, config.name, config.image_size)
    return Model(config, vqgan, unet, str(path))


DEMO_NAME = "demo"
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo_model"
"""The bundled demonstration model (512 px, trained from real SZCH pairs with the data engine; see
its README.md)."""


def resolve(spec: str | Path) -> Model:
    """A model from a directory, 'demo' (the bundled demonstration model) or an untrained one from
    'random:<config>' (e.g. 'random:tiny')."""
    text = str(spec)
    if text.startswith("random:"):
        return random_model(text.split(":", 1)[1])
    # A directory named 'demo' in the working directory wins: the user's data comes first.
    if text == DEMO_NAME and not Path(text).is_dir():
        return load(DEMO_DIR)
    return load(text)
