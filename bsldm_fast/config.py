"""Typed, frozen model configurations with a JSON round trip.

`paper` is the published BS-LDM model (Sun et al., IEEE JBHI 2025; the authors' `model.py` and
`config.py`). `small` and `tiny` keep the same architecture at sizes a CPU can run in tests and demos.
The JSON written beside the weights (`config.json`) is the only description of a model that travels
between training, conversion, export and inference.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1


@dataclass(frozen=True)
class VQGANConfig:
    """monai-generative `VQVAE`: stride-2 kernel-4 stages, ReLU residual units, an EMA codebook."""

    in_channels: int = 1
    """Image channels (grey-scale radiographs)."""
    out_channels: int = 1
    """Decoded image channels."""
    channels: tuple[int, ...] = (128, 256, 512)
    """Feature channels of each stride-2 stage; the image shrinks by 2**len(channels)."""
    res_channels: tuple[int, ...] = (512, 512, 512)
    """Hidden channels of the residual units of each stage."""
    num_res_layers: int = 2
    """Residual units per stage."""
    num_embeddings: int = 256
    """Codebook size."""
    embedding_dim: int = 4
    """Latent channels (the dimension of each code)."""
    commitment_cost: float = 0.25
    """Training only: weight of the commitment loss."""
    ema_decay: float = 0.5
    """Training only: EMA decay of the codebook update (monai-generative's default)."""
    ema_epsilon: float = 1e-5
    """Training only: Laplace smoothing of the EMA cluster sizes."""

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.channels)


@dataclass(frozen=True)
class UNetConfig:
    """OpenAI guided-diffusion `UNetModel`, as the BS-LDM repository configures it."""

    in_channels: int = 8
    """Noisy soft-tissue latent (4) + CXR latent (4)."""
    out_channels: int = 8
    """The original predicts 8 channels; only the first `latent_channels` are used."""
    model_channels: int = 128
    """Base width; also the sinusoidal timestep-embedding size."""
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    """Width multiplier of each resolution level."""
    num_res_blocks: int = 8
    """Residual blocks per level on the way down (one more on the way up)."""
    attention_resolutions: tuple[int, ...] = (8, 16, 32)
    """Downsample rates (1, 2, 4, ...) at which self-attention follows each residual block."""
    num_heads: int = 8
    """Attention heads (when `num_head_channels` is -1)."""
    num_head_channels: int = -1
    """Fixed channels per head instead of a fixed head count; -1 disables."""
    num_heads_upsample: int = -1
    """Heads on the way up; -1 means `num_heads`."""
    use_scale_shift_norm: bool = True
    """FiLM-style timestep conditioning: GroupNorm(h) * (1 + scale) + shift."""
    resblock_updown: bool = True
    """Residual blocks (not plain convolutions) change the resolution."""
    use_new_attention_order: bool = False
    """False: guided-diffusion's legacy QKV split (what the official weights use)."""
    dropout: float = 0.0
    """Training only: dropout inside residual blocks."""

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and the BS-LDM sampling tricks (Sun et al. 2025, Sec. III)."""

    num_train_timesteps: int = 1000
    """Training timesteps T."""
    beta_schedule: str = "squaredcos_cap_v2"
    """'squaredcos_cap_v2' (cosine, Nichol & Dhariwal 2021) or 'linear'."""
    beta_start: float = 0.0008
    """First beta of the 'linear' schedule (unused by the cosine schedule)."""
    beta_end: float = 0.02
    """Last beta of the 'linear' schedule (unused by the cosine schedule)."""
    latent_channels: int = 4
    """Channels of one latent (soft tissue or CXR)."""
    offset_noise_coefficient: float = 0.1
    """Offset noise: eps + c * eps_c, eps_c per sample and channel, broadcast over space."""
    clip_sample: bool = True
    """Dynamic clipping ("temporal adaptive thresholding") of the predicted x0."""
    clip_range_start: float = 1.4
    """Clip range of the first denoising step."""
    clip_range_rate: float = 0.003
    """Widening of the clip range per step of the 1000-step schedule."""
    condition_scaling: str = "none"
    """How the CXR latent enters the U-Net: 'none' (unscaled, as sampled) or 'original'
    (scaled by sqrt(alpha_bar_t), as the original training noised it)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a BS-LDM model; serialised as `config.json` beside the weights."""

    name: str = "paper"
    """A label for people; nothing depends on it."""
    image_size: int = 1024
    """Model resolution (square); inputs are resized to it and back."""
    vqgan: VQGANConfig = field(default_factory=VQGANConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    version: int = CONFIG_VERSION
    """Format version of this file."""

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vqgan.downsample_factor

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "config")

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_json(Path(path).read_text())

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (known: {sorted(fields)})")
    if cls is ModelConfig and data.get("version", CONFIG_VERSION) > CONFIG_VERSION:
        raise ValueError(
            f"{where}: format version {data['version']} is newer than this bsldm_fast "
            f"understands ({CONFIG_VERSION}); upgrade bsldm_fast"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        nested = {"vqgan": VQGANConfig, "unet": UNetConfig, "diffusion": DiffusionConfig}
        if cls is ModelConfig and name in nested:
            kwargs[name] = _from_dict(nested[name], value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def validate(config: ModelConfig) -> None:
    """Reject configurations that cannot build a working model, with the reason."""
    v, u, d = config.vqgan, config.unet, config.diffusion
    if len(v.res_channels) != len(v.channels):
        raise ValueError("vqgan.res_channels needs one entry per stage in vqgan.channels")
    if config.image_size % v.downsample_factor:
        raise ValueError(
            f"image_size {config.image_size} is not divisible by the VQGAN's downsample factor "
            f"{v.downsample_factor}"
        )
    if u.in_channels != 2 * d.latent_channels or v.embedding_dim != d.latent_channels:
        raise ValueError(
            "the U-Net takes the noisy latent and the CXR latent: unet.in_channels must be "
            "2 * diffusion.latent_channels and vqgan.embedding_dim must equal latent_channels"
        )
    if u.out_channels < d.latent_channels:
        raise ValueError("unet.out_channels must be at least diffusion.latent_channels")
    levels = len(u.channel_mult) - 1
    if config.latent_size % (2**levels):
        raise ValueError(
            f"latent size {config.latent_size} cannot be halved {levels} times by the U-Net"
        )
    for width in {u.model_channels * m for m in u.channel_mult}:
        if width % 32:
            raise ValueError(f"U-Net width {width} is not divisible by GroupNorm's 32 groups")
    if d.beta_schedule not in ("squaredcos_cap_v2", "linear"):
        raise ValueError(f"unknown beta_schedule {d.beta_schedule!r}")
    if d.condition_scaling not in ("none", "original"):
        raise ValueError(f"unknown condition_scaling {d.condition_scaling!r}")


PAPER = ModelConfig()

SMALL = ModelConfig(
    name="small",
    image_size=256,
    vqgan=VQGANConfig(channels=(32, 64, 128), res_channels=(64, 64, 128), num_res_layers=1),
    unet=UNetConfig(
        out_channels=4,
        model_channels=64,
        channel_mult=(1, 2, 2, 4),
        num_res_blocks=2,
        attention_resolutions=(4, 8),
        num_heads=4,
    ),
)

TINY = ModelConfig(
    name="tiny",
    image_size=64,
    vqgan=VQGANConfig(channels=(16, 32, 32), res_channels=(16, 32, 32), num_res_layers=1),
    unet=UNetConfig(
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(2,),
        num_heads=2,
    ),
)

PRESETS: dict[str, ModelConfig] = {"paper": PAPER, "small": SMALL, "tiny": TINY}


def preset(name: str) -> ModelConfig:
    """A named configuration: 'paper', 'small' or 'tiny'."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose one of {sorted(PRESETS)}") from None
