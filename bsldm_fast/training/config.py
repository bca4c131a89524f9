"""The training configuration: one frozen dataclass, read from YAML/JSON with command-line overrides.

Defaults are the BS-LDM recipe (Sun et al. 2025; the authors' `config.py`, `vq-gan_train.py` and
`ldm_train.py`). Fields that differ between the two stages default to None and are filled in by
`resolve()`, so the saved `train_config.json` always holds the values actually used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..diffusion.plan import SAMPLERS
from ..precision import dtype_of

STAGES = ("vqgan", "ldm")
PERCEPTUAL_ENV = "BSLDM_PERCEPTUAL_WEIGHTS"
"""Environment variable naming the LPIPS-VGG weights file when --perceptual-weights is not given."""

# Stage-dependent defaults (None in the dataclass): the original's config.py.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vqgan": {"epochs": 1000, "batch_size": 4, "lr": 1e-4, "milestones": ()},
    "ldm": {"epochs": 2500, "batch_size": 4, "lr": 2e-4, "milestones": (200, 400, 750, 1500)},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as `train_config.json` beside the checkpoints."""

    stage: str = "vqgan"
    """'vqgan' (autoencoder) or 'ldm' (conditional latent diffusion)."""
    data: str = ""
    """Folder with CXR/<name>.png and BS/<name>.png (same names), as the original repository."""
    out: str = "runs/train"
    """Run folder: checkpoints, logs, samples, the resolved config and the exported model."""
    model: str = "small"
    """Model architecture: a preset ('paper', 'small', 'tiny') or a ModelConfig JSON file."""
    vqgan: str = ""
    """LDM only: the frozen VQGAN, as a model directory, a VQGAN export, a run folder or a checkpoint."""

    # Data
    split_dir: str = ""
    """Where train_set.txt / test_set.txt live (made once, then reused); default: the data folder,
    or the run folder when the data folder is read-only."""
    val_fraction: float = 0.1
    """Share of the pairs held out for validation when the split files are made."""
    split_seed: int = 0
    """Seed of the split, independent of `seed` so that both stages share one split."""
    augment: bool = False
    """Pair-aligned augmentation: one small affine and intensity jitter shared by CXR and BS."""
    max_rotate: float = 5.0
    """Augmentation: largest rotation in degrees."""
    max_translate: float = 0.03
    """Augmentation: largest shift as a fraction of the image size."""
    max_scale: float = 0.05
    """Augmentation: largest relative zoom."""
    intensity_jitter: float = 0.05
    """Augmentation: largest contrast/brightness change (same for both images of a pair)."""
    crop_size: int = 0
    """Train on random square crops of this side (pixels at the model's resolution) instead of whole
    images; 0 = whole images. The networks are convolutional, so patches train the same weights at
    a fraction of the cost. Validation always uses whole images."""
    workers: int = 2
    """DataLoader worker processes per rank (0 loads in the main process)."""

    # Optimisation
    epochs: int | None = None
    """Training epochs (vqgan 1000, ldm 2500 in the original)."""
    batch_size: int | None = None
    """Images (vqgan) or pairs (ldm) per rank and micro-step (4 in the original)."""
    grad_accum: int = 1
    """Micro-steps whose gradients are summed before each optimiser step."""
    lr: float | None = None
    """Learning rate: vqgan generator Adam 1e-4, ldm AdamW 2e-4."""
    lr_d: float = 5e-4
    """VQGAN only: discriminator Adam learning rate."""
    milestones: tuple[int, ...] | None = None
    """MultiStepLR milestones in epochs (ldm: 200, 400, 750, 1500; vqgan: none)."""
    gamma: float = 0.1
    """MultiStepLR decay factor."""
    ema_decay: float = 0.995
    """LDM only: EMA decay of the U-Net weights (torch_ema with its num_updates warm-up)."""
    max_steps: int = 0
    """Stop after this many optimiser steps (0: run all epochs); for smoke tests and timing."""

    # VQGAN losses (the paper's multi-level hybrid loss)
    perceptual: bool = True
    """VQGAN only: use the perceptual (LPIPS-VGG) term; turning it off must be explicit."""
    perceptual_weights: str = ""
    """LPIPS-VGG weights file(s) (':'-separated), else $BSLDM_PERCEPTUAL_WEIGHTS; 'random' (tests only)."""
    perceptual_weight: float = 0.001
    """Weight of the perceptual term."""
    adv_weight: float = 0.01
    """Weight of the least-squares patch-discriminator terms."""
    disc_layers: int = 3
    """Patch discriminator: strided layers."""
    disc_channels: int = 64
    """Patch discriminator: channels of the first layer."""

    # LDM
    condition_scaling: str = "none"
    """'none' (CXR latent unscaled, as sampled) or 'original' (scaled by sqrt(alpha_bar_t) as the
    original trained it); recorded in the exported model's config."""
    offset_noise: bool = True
    """Offset noise eps + c * eps_c in training (c from the model's diffusion config, 0.1)."""
    export_ema: bool = True
    """Export the EMA U-Net weights (False: the raw weights, as the original saved)."""

    # Practicalities
    channels_last: bool = False
    """LDM: run the frozen VQGAN and the U-Net in channels-last memory layout (oneDNN's fast path
    on CPUs: about 2x for the narrow convolutions of CPU-sized models)."""
    precision: str = "fp32"
    """Autocast precision of the trained network: 'fp32', 'bf16' or 'fp16' (with a grad scaler)."""
    device: str = "auto"
    """'auto' (CUDA when present), 'cpu' or 'cuda'; under torchrun each rank takes its LOCAL_RANK GPU."""
    threads: int = 0
    """CPU threads per process for torch (0: torch's default). On a shared CPU, 1 can be much faster."""
    seed: int = 0
    """Seed of initialisation, data order, augmentation and diffusion noise."""
    val_every: int = 10
    """Validate every K epochs (the original: 10); 0 disables."""
    val_batches: int = 0
    """Validation batches for the loss (0: the whole validation split)."""
    val_samples: int = 4
    """Validation pairs sampled/reconstructed for images and metrics."""
    val_sampler: str = "dpmpp"
    """LDM validation sampler ('ddpm', 'ddim', 'dpmpp')."""
    val_steps: int = 20
    """LDM validation sampling steps."""
    checkpoint_every: int = 10
    """Checkpoint every N epochs (0: only at the end)."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N optimiser steps (0: off)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (the oldest are removed; 0 keeps all)."""
    resume: str = ""
    """'auto' (latest checkpoint of the run folder, if any), a checkpoint folder, or '' (fresh)."""
    export: str = ""
    """Where the final model goes (default: <out>/model)."""
    log_every: int = 10
    """Write training losses to the logs every N optimiser steps."""
    tensorboard: bool = True
    """Also log to TensorBoard when it is installed."""
    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _base_type(hint: Any) -> Any:
    """int for `int | None`, tuple for `tuple[int, ...]`, ..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(args[0])
    return hint


def _coerce(name: str, value: Any) -> Any:
    """A value from a file or the command line, checked against the field's type."""
    if name not in FIELDS:
        raise ValueError(f"unknown training option {name!r}; known: {', '.join(sorted(FIELDS))}")
    if value is None:
        return None
    kind = _base_type(_HINTS[name])
    origin = typing.get_origin(kind)
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return tuple(int(v) for v in items if str(v).strip() != "")
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        return float(value)
    return str(value)


def load_file(path: str | Path) -> dict[str, Any]:
    """Options from a YAML (.yaml/.yml) or JSON file: a flat mapping of option names to values."""
    path = Path(path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(stage: str, file: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < config file < overrides (None values in overrides are ignored), then resolved."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    values: dict[str, Any] = {}
    if file:
        values.update({k: _coerce(k, v) for k, v in load_file(file).items()})
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _coerce(key, value)
    values["stage"] = stage
    return resolve(TrainConfig(**values))


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill the stage defaults and the environment, then check every option."""
    changes = {k: v for k, v in STAGE_DEFAULTS[config.stage].items() if getattr(config, k) is None}
    if config.stage == "vqgan" and config.perceptual and not config.perceptual_weights:
        changes["perceptual_weights"] = os.environ.get(PERCEPTUAL_ENV, "")
    config = config.replace(**changes)
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Reject options that cannot run, saying why."""
    if not config.data:
        raise ValueError("--data is required: a folder with CXR/ and BS/ subfolders")
    if config.stage == "ldm" and not config.vqgan:
        raise ValueError("the ldm stage needs --vqgan: a trained VQGAN (model dir, export, run or checkpoint)")
    dtype_of(config.precision)
    if config.condition_scaling not in ("none", "original"):
        raise ValueError("condition_scaling must be 'none' or 'original'")
    if config.val_sampler not in SAMPLERS:
        raise ValueError(f"val_sampler must be one of {SAMPLERS}")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    for name in ("threads", "val_every", "checkpoint_every", "checkpoint_every_steps", "keep_checkpoints",
                 "max_steps", "workers", "val_batches", "val_samples"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative")
    if config.stage == "vqgan" and config.perceptual and config.perceptual_weight > 0:
        if not config.perceptual_weights:
            raise ValueError(
                "the VQGAN's perceptual loss needs pretrained LPIPS-VGG weights: pass "
                f"--perceptual-weights FILE or set ${PERCEPTUAL_ENV} (see training/README.md), "
                "or turn the perceptual term off explicitly with --no-perceptual"
            )


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("stage",)) -> None:
    """One `--option` per TrainConfig field (default None: only what is given overrides)."""
    for name, f in FIELDS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        doc = (f.metadata or {}).get("help") or _DOCS.get(name, "")
        kind = _base_type(_HINTS[name])
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=doc)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, dest=name, default=None, metavar="N,N,...", help=doc)
        else:
            parser.add_argument(flag, dest=name, type=kind, default=None, help=doc)


def _field_docs() -> dict[str, str]:
    """The attribute docstrings of TrainConfig, for --help."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            value = getattr(following, "value", None)
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docs[node.target.id] = " ".join(value.value.split()).replace("%", "%%")  # type: ignore[union-attr]
    return docs


_DOCS = _field_docs()
