"""Typed, frozen model configurations with a JSON round trip.

`paper` is the published BS-LDM model (Sun et al., IEEE JBHI 2025; the authors' `model.py` and
`config.py`). `small` and `tiny` keep the same architecture at sizes a CPU can run in tests and demos.
The JSON written beside the weights (`config.json`) is the only description of a model that travels
between training, conversion, export and inference.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
    quantize_sample: bool = False
    """Snap the sampled soft-tissue latent to the nearest codebook entries before decoding. The
    original decodes it unquantised (False); a small codebook's decoder turns the residual noise a
    few-step sampler leaves into a latent-grid texture, which quantising removes."""


NORMALIZATIONS = ("none", "percentile")
ANCHORS = ("none", "input")


@dataclass(frozen=True)
class InputNormalization:
    """An intensity normalisation of the input before the model, inverted on its output.

    Radiographs from other scanners come with other display curves; 'percentile' maps the input's
    `low_percentile` / `high_percentile` grey levels linearly onto `low_value` / `high_value` (where
    the model's training images had them), runs the model, and maps the result back with the
    inverse, so the output keeps the input's own scale. 'none' (the default) is the original
    mapping, which the official weights expect.
    """

    mode: str = "none"
    """'none' or 'percentile'."""
    low_percentile: float = 1.0
    high_percentile: float = 99.0
    low_value: float = 0.0
    """Where the low percentile lands, on the model's [0, 1] display scale."""
    high_value: float = 1.0
    """Where the high percentile lands, on the model's [0, 1] display scale."""


@dataclass(frozen=True)
class OutputAnchor:
    """Where the output's low spatial frequencies come from.

    Bones are edges and bands a few to a few tens of pixels wide; the grey level of whole regions
    is display convention, which the soft-tissue images of a handful of training pairs cannot pin
    down: a model trained on them samples it anew with every seed (the bundled model's global
    level varies by about +-0.1 between seeds). 'input' keeps the model's output above the scale
    `sigma` and takes the scale below it from the input, shifted by `offset`:

        output = soft + blur_sigma(input + offset - soft)

    with `offset` the mean soft-tissue minus CXR grey level of the training pairs. 'none' (the
    default) returns the model's output as it is, which the official weights expect.
    """

    mode: str = "none"
    """'none' or 'input'."""
    sigma: float = 1.0 / 32.0
    """Standard deviation of the Gaussian low-pass, as a fraction of the image width (1/32: 32 px
    at 1024 px)."""
    offset: float = 0.0
    """Added to the input's low frequencies, on the [0, 1] display scale."""


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
    input_normalization: InputNormalization = field(default_factory=InputNormalization)
    output_anchor: OutputAnchor = field(default_factory=OutputAnchor)
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
        try:
            data = json.loads(text)
        except RecursionError:
            # json recurses once per nesting level: a crafted file must not end in a RecursionError
            raise ValueError("JSON nested too deeply to be a model config") from None
        return cls.from_dict(data)

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
    version = data.get("version", CONFIG_VERSION) if cls is ModelConfig else CONFIG_VERSION
    if not _is_int(version) or version < 1:
        raise ValueError(f"{where}.version: expected a positive integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"{where}: format version {version} is newer than this bsldm_fast "
            f"understands ({CONFIG_VERSION}); upgrade bsldm_fast"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        nested = {"vqgan": VQGANConfig, "unet": UNetConfig, "diffusion": DiffusionConfig,
                  "input_normalization": InputNormalization, "output_anchor": OutputAnchor}
        if cls is ModelConfig and name in nested:
            kwargs[name] = _from_dict(nested[name], value, f"{where}.{name}")
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def validate(config: ModelConfig) -> None:
    """Reject configurations that cannot build a working model, with the reason.

    A config.json may come from anyone, so every field is checked for its type and against finite
    bounds (`LIMITS`), then the model's size (parameters, and activation memory for one image)
    is estimated from the config alone and checked against `MAX_PARAMETERS` and
    `MAX_ACTIVATION_BYTES`: all before a single tensor is allocated. Each message names the field.
    """
    _check_fields(config)
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
    n = config.input_normalization
    if n.mode not in NORMALIZATIONS:
        raise ValueError(f"input_normalization.mode: {n.mode!r} is not one of {NORMALIZATIONS}")
    if not (n.low_percentile < n.high_percentile and n.low_value < n.high_value):
        raise ValueError("input_normalization: low_percentile < high_percentile and "
                         "low_value < high_value are required")
    if config.output_anchor.mode not in ANCHORS:
        raise ValueError(f"output_anchor.mode: {config.output_anchor.mode!r} is not one of {ANCHORS}")
    _check_heads(config)
    _check_size(config)


# ---------------------------------------------------------------------------------------------
# Bounds and size estimates: a config.json may come from anyone, and a crafted one must fail with
# a named field, fast, instead of allocating terabytes or recursing forever.

MAX_PARAMETERS = 2_000_000_000
"""Most weights (VQGAN + U-Net, buffers included) a config may describe: 8 GB in float32, about
five times the paper model (0.42 G)."""
MAX_ACTIVATION_BYTES = 32 * 1024**3
"""Most activation memory, estimated for one image in float32, a config may need (the paper model:
0.75 GiB)."""

_ANY_INT = (-(2**31), 2**31 - 1)
LIMITS: dict[str, tuple[float, float]] = {
    "image_size": (1, 16384),
    "name": (0, 256),  # characters
    "version": (1, CONFIG_VERSION),
    "vqgan.in_channels": (1, 1),
    "vqgan.out_channels": (1, 1),
    "vqgan.channels": (1, 4096),
    "vqgan.channels#": (1, 8),  # '#': the number of entries
    "vqgan.res_channels": (1, 4096),
    "vqgan.res_channels#": (1, 8),
    "vqgan.num_res_layers": (0, 32),
    "vqgan.num_embeddings": (1, 65536),
    "vqgan.embedding_dim": (1, 64),
    "vqgan.commitment_cost": (0.0, 1e6),
    "vqgan.ema_decay": (0.0, 1.0),
    "vqgan.ema_epsilon": (0.0, 1.0),
    "unet.in_channels": (2, 128),
    "unet.out_channels": (1, 128),
    "unet.model_channels": (1, 4096),
    "unet.channel_mult": (1, 64),
    "unet.channel_mult#": (1, 8),
    "unet.num_res_blocks": (1, 64),
    "unet.attention_resolutions": (1, 65536),
    "unet.attention_resolutions#": (0, 16),
    "unet.num_heads": (1, 4096),
    "unet.num_head_channels": (-1, 4096),
    "unet.num_heads_upsample": (-1, 4096),
    "unet.dropout": (0.0, 0.999),
    "diffusion.num_train_timesteps": (1, 100_000),
    "diffusion.beta_start": (0.0, 1.0),
    "diffusion.beta_end": (0.0, 1.0),
    "diffusion.latent_channels": (1, 64),
    "diffusion.offset_noise_coefficient": (0.0, 100.0),
    "diffusion.clip_range_start": (0.0, 1e6),
    "diffusion.clip_range_rate": (0.0, 1e6),
    "input_normalization.low_percentile": (0.0, 100.0),
    "input_normalization.high_percentile": (0.0, 100.0),
    "input_normalization.low_value": (-1.0, 2.0),
    "input_normalization.high_value": (-1.0, 2.0),
    "output_anchor.sigma": (1e-3, 1.0),
    "output_anchor.offset": (-1.0, 1.0),
}
"""Inclusive bounds of every numeric field (and of the length of each list, `FIELD#`)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_value(where: str, value: Any, kind: type, key: str | None = None) -> None:
    low, high = LIMITS.get(key or where, _ANY_INT)
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
        if len(value) > max(high, 64):
            raise ValueError(f"{where}: string of {len(value)} characters (at most {max(high, 64)})")
    elif kind is int:
        if not _is_int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r:.40}")
        if not low <= value <= high or (low == -1 and value == 0):
            raise ValueError(f"{where}: {value} is outside [{low}, {high}]"
                             + (" (-1 or a positive number)" if low == -1 else ""))
    elif kind is float:
        if not _is_number(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r:.40}")
        if not low <= value <= high:
            raise ValueError(f"{where}: {value} is outside [{low}, {high}]")


def _check_fields(config: "ModelConfig") -> None:
    """Types and bounds of every field, named as in config.json (`unet.num_heads`)."""
    sections = [("", config)] + [(f"{f.name}.", getattr(config, f.name))
                                 for f in dataclasses.fields(config)
                                 if dataclasses.is_dataclass(getattr(config, f.name))]
    for prefix, section in sections:
        hints = {f.name: f.type for f in dataclasses.fields(section)}
        for name, hint in hints.items():
            value = getattr(section, name)
            where = prefix + name
            if dataclasses.is_dataclass(value):
                continue
            hint = str(hint)
            if hint.startswith("tuple"):
                if not isinstance(value, tuple):
                    raise ValueError(f"{where}: expected a list of integers, got "
                                     f"{type(value).__name__}")
                low, high = LIMITS.get(where + "#", (0, 64))
                if not low <= len(value) <= high:
                    raise ValueError(f"{where}: {len(value)} entries (allowed: {low} to {high})")
                for i, item in enumerate(value):
                    _check_value(f"{where}[{i}]", item, int, key=where)
            elif hint in ("int", "float", "bool", "str"):
                _check_value(where, value, {"int": int, "float": float, "bool": bool,
                                            "str": str}[hint])
            else:
                raise ValueError(f"{where}: unexpected field type {hint}")


def _check_heads(config: "ModelConfig") -> None:
    """Attention heads must split every width that has attention (guided-diffusion's rule)."""
    u = config.unet
    ds, down, up = 1, set(), set()
    for level, mult in enumerate(u.channel_mult):
        if ds in u.attention_resolutions:
            down.add(u.model_channels * mult)
            up.add(u.model_channels * mult)
        if level != len(u.channel_mult) - 1:
            ds *= 2
    down.add(u.model_channels * u.channel_mult[-1])  # the middle block always has attention
    for widths, heads, field_name in ((down, u.num_heads, "unet.num_heads"),
                                      (up, u.heads_upsample, "unet.num_heads_upsample")):
        for width in sorted(widths):
            if u.num_head_channels != -1:
                if width % u.num_head_channels:
                    raise ValueError(f"unet.num_head_channels: {u.num_head_channels} does not "
                                     f"divide the attention width {width}")
            elif width % heads:
                raise ValueError(f"{field_name}: {heads} heads do not split the attention width "
                                 f"{width}")


def state_shapes(config: "ModelConfig") -> dict[str, dict[str, tuple[int, ...]]]:
    """The name and shape of every tensor in the two networks' state dicts, from the config alone
    (tests/test_modeldir.py checks them against the built modules). {'vqgan': ..., 'unet': ...}"""
    v, u = config.vqgan, config.unet
    vq: dict[str, tuple[int, ...]] = {}

    def conv(key: str, cin: int, cout: int, k: int, dims: int = 2, transposed: bool = False):
        vq_or_unet = out
        vq_or_unet[f"{key}.weight"] = ((cin, cout) if transposed else (cout, cin)) + (k,) * dims
        vq_or_unet[f"{key}.bias"] = (cout,)

    out = vq
    block, cin = 0, v.in_channels
    for ch, res in zip(v.channels, v.res_channels):
        conv(f"encoder.blocks.{block}.conv", cin, ch, 4)
        block += 1
        for _ in range(v.num_res_layers):
            conv(f"encoder.blocks.{block}.conv1.conv", ch, res, 3)
            conv(f"encoder.blocks.{block}.conv2.conv", res, ch, 3)
            block += 1
        cin = ch
    conv(f"encoder.blocks.{block}.conv", cin, v.embedding_dim, 3)
    channels, res_channels = v.channels[::-1], v.res_channels[::-1]
    conv("decoder.blocks.0.conv", v.embedding_dim, channels[0], 3)
    block = 1
    for i, (ch, res) in enumerate(zip(channels, res_channels)):
        for _ in range(v.num_res_layers):
            conv(f"decoder.blocks.{block}.conv1.conv", ch, res, 3)
            conv(f"decoder.blocks.{block}.conv2.conv", res, ch, 3)
            block += 1
        cout = v.out_channels if i == len(channels) - 1 else channels[i + 1]
        conv(f"decoder.blocks.{block}.conv", ch, cout, 4, transposed=True)
        block += 1
    vq["quantizer.embedding.weight"] = (v.num_embeddings, v.embedding_dim)
    vq["quantizer.ema_cluster_size"] = (v.num_embeddings,)
    vq["quantizer.ema_w"] = (v.num_embeddings, v.embedding_dim)

    unet: dict[str, tuple[int, ...]] = {}
    out = unet
    mc, emb = u.model_channels, 4 * u.model_channels

    def linear(key: str, cin: int, cout: int):
        unet[f"{key}.weight"], unet[f"{key}.bias"] = (cout, cin), (cout,)

    def norm(key: str, ch: int):
        unet[f"{key}.weight"], unet[f"{key}.bias"] = (ch,), (ch,)

    def res(key: str, ch: int, cout: int):
        norm(f"{key}.in_layers.0", ch)
        conv(f"{key}.in_layers.2", ch, cout, 3)
        linear(f"{key}.emb_layers.1", emb, 2 * cout if u.use_scale_shift_norm else cout)
        norm(f"{key}.out_layers.0", cout)
        conv(f"{key}.out_layers.3", cout, cout, 3)
        if cout != ch:
            conv(f"{key}.skip_connection", ch, cout, 1)

    def attn(key: str, ch: int):
        norm(f"{key}.norm", ch)
        conv(f"{key}.qkv", ch, 3 * ch, 1, dims=1)
        conv(f"{key}.proj_out", ch, ch, 1, dims=1)

    def resample(key: str, ch: int, op: str):
        if u.resblock_updown:
            res(key, ch, ch)
        else:
            conv(f"{key}.{op}", ch, ch, 3)

    linear("time_embed.0", mc, emb)
    linear("time_embed.2", emb, emb)
    ch = input_ch = u.channel_mult[0] * mc
    conv("input_blocks.0.0", u.in_channels, ch, 3)
    skips, ds, block = [ch], 1, 1
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            res(f"input_blocks.{block}.0", ch, mult * mc)
            ch = mult * mc
            if ds in u.attention_resolutions:
                attn(f"input_blocks.{block}.1", ch)
            skips.append(ch)
            block += 1
        if level != len(u.channel_mult) - 1:
            resample(f"input_blocks.{block}.0", ch, "op")
            skips.append(ch)
            block += 1
            ds *= 2
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    block = 0
    for level, mult in list(enumerate(u.channel_mult))[::-1]:
        for i in range(u.num_res_blocks + 1):
            res(f"output_blocks.{block}.0", ch + skips.pop(), mc * mult)
            ch, part = mc * mult, 1
            if ds in u.attention_resolutions:
                attn(f"output_blocks.{block}.1", ch)
                part = 2
            if level and i == u.num_res_blocks:
                resample(f"output_blocks.{block}.{part}", ch, "conv")
                ds //= 2
            block += 1
    norm("out.0", ch)
    conv("out.2", input_ch, u.out_channels, 3)
    return {"vqgan": vq, "unet": unet}


def parameter_count(config: "ModelConfig") -> int:
    """Numbers in both networks' state dicts (weights and buffers), from the config alone."""
    return sum(math.prod(shape) for part in state_shapes(config).values()
               for shape in part.values())


def activation_bytes(config: "ModelConfig") -> int:
    """An estimate of the activation memory one image needs in float32: the larger of the VQGAN's
    peak (a stage's input, hidden and output maps at once, or the codebook's distance matrix) and
    the U-Net's (every skip connection, a few maps of the widest level, and the attention matrix)."""
    v, u = config.vqgan, config.unet
    side = config.image_size
    vq_peak = side * side * 2
    for ch, res in zip(v.channels, v.res_channels):
        side //= 2
        vq_peak = max(vq_peak, (2 * ch + res) * side * side)
    latent = config.latent_size * config.latent_size
    vq_peak = max(vq_peak, 3 * latent * v.num_embeddings)
    side, ch = config.latent_size, u.channel_mult[0] * u.model_channels
    skips = [ch * side * side]
    widest, attention = 0, 0
    heads = max(u.num_heads, u.heads_upsample) if u.num_head_channels == -1 else None
    for level, mult in enumerate(u.channel_mult):
        ch = mult * u.model_channels
        area = side * side
        skips.extend([ch * area] * (u.num_res_blocks + 1))
        widest = max(widest, 2 * ch * area)
        ds = 2**level
        if ds in u.attention_resolutions or level == len(u.channel_mult) - 1:
            n = heads if heads is not None else ch // u.num_head_channels
            attention = max(attention, n * area * area)
        side = max(1, side // 2)
    unet_peak = sum(skips) + 4 * widest + attention
    return 4 * max(vq_peak, unet_peak)


def _check_size(config: "ModelConfig") -> None:
    params = parameter_count(config)
    if params > MAX_PARAMETERS:
        raise ValueError(f"the config describes {params / 1e9:.3g} G parameters, more than the "
                         f"limit of {MAX_PARAMETERS / 1e9:.3g} G (check unet.model_channels, "
                         "unet.channel_mult, unet.num_res_blocks, vqgan.channels, "
                         "vqgan.num_embeddings)")
    need = activation_bytes(config)
    if need > MAX_ACTIVATION_BYTES:
        raise ValueError(f"the config needs about {need / 1024**3:.3g} GiB of activations per "
                         f"image, more than the limit of {MAX_ACTIVATION_BYTES / 1024**3:.0f} GiB "
                         "(check image_size, vqgan.channels, vqgan.res_channels, "
                         "vqgan.num_embeddings, unet.attention_resolutions)")


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
