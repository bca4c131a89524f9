"""Configurations read off the weights, and the checks that the weights fit a configuration.

Tensor names and shapes give the channels, levels, residual blocks, attention placement and
codebook; a pickled whole module adds what tensors cannot show (attention heads, the attention
variant, strides and paddings), which `check_modules` compares layer by layer with ours.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from ..config import UNetConfig, VQGANConfig
from ..models.unet import AttentionBlock, ResBlock
from ..models.vqgan import ConvBlock
from .checkpoint import Weights
from .unpickler import PickledObject

logger = logging.getLogger(__name__)


class ConvertError(ValueError):
    """The weights do not describe a BS-LDM network, or do not fit the requested config."""


# --------------------------------------------------------------------------------------------
# names


def vqgan_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """monai-generative names -> ours: only the codebook moves (`quantizer.quantizer.*`)."""
    return {_vqgan_path(k): v for k, v in state.items()}


def _vqgan_path(name: str) -> str:
    if name == "quantizer.quantizer" or name.startswith("quantizer.quantizer."):
        return "quantizer" + name[len("quantizer.quantizer"):]
    return name


def _need(state: dict[str, torch.Tensor], name: str, what: str) -> torch.Tensor:
    if name not in state:
        raise ConvertError(f"{what}: tensor {name} is missing; these are not {what} weights")
    return state[name]


def _layer_kind(rest: str) -> str:
    if rest.startswith(("in_layers.", "emb_layers.", "out_layers.", "skip_connection.")):
        return "res"
    if rest.startswith(("qkv.", "norm.", "proj_out.")):
        return "attn"
    if rest.startswith("op."):
        return "down"
    if rest.startswith("conv."):
        return "up"
    if rest in ("weight", "bias"):
        return "conv"
    return "?"


def _blocks(state: dict[str, torch.Tensor], group: str) -> list[list[str]]:
    """Layer kinds of each numbered block of `group`: [['conv'], ['res', 'attn'], ...]."""
    pattern = re.compile(rf"^{group}\.(\d+)\.(\d+)\.(.+)$")
    layers: dict[int, dict[int, str]] = {}
    for name in state:
        m = pattern.match(name)
        if m:
            layers.setdefault(int(m[1]), {})[int(m[2])] = _layer_kind(m[3])
    if sorted(layers) != list(range(len(layers))):
        raise ConvertError(f"U-Net: {group} are not numbered 0..{len(layers) - 1}")
    return [[kinds[j] for j in sorted(kinds)] for _, kinds in sorted(layers.items())]


# --------------------------------------------------------------------------------------------
# inference


def infer_unet(weights: Weights, fallback: UNetConfig) -> UNetConfig:
    """guided-diffusion `UNetModel` hyper-parameters from its tensors (and pickled attributes).

    Heads and the attention variant are not in the tensors: they come from a pickled module's
    attributes, else from `fallback` (logged).
    """
    s, what = weights.state, "U-Net"
    if "label_emb.weight" in s:
        raise ConvertError("U-Net: class-conditional models (label_emb) are not BS-LDM's U-Net")
    mc = _need(s, "time_embed.0.weight", what).shape[1]
    in_channels = _need(s, "input_blocks.0.0.weight", what).shape[1]
    out_channels = _need(s, "out.2.weight", what).shape[0]
    ins, outs = _blocks(s, "input_blocks"), _blocks(s, "output_blocks")
    # The last block of every output level but the first resolution carries the upsampler.
    ups = [k for k, layers in enumerate(outs) if "up" in layers or layers.count("res") > 1]
    per_level = ups[0] + 1 if ups else len(outs)
    levels = len(outs) // per_level if per_level else 0
    n_res = per_level - 1
    if (n_res < 1 or len(outs) != levels * per_level or len(ins) != levels * per_level
            or ups != [per_level * (k + 1) - 1 for k in range(levels - 1)]):
        raise ConvertError(
            f"U-Net: {len(ins)} input and {len(outs)} output blocks do not form guided-diffusion's "
            "levels of residual blocks"
        )
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * per_level
        width = _need(s, f"input_blocks.{first}.0.in_layers.2.weight", what).shape[0]
        if width % mc:
            raise ConvertError(f"U-Net: level {level} width {width} is not a multiple of {mc}")
        mult.append(width // mc)
        if "attn" in ins[first]:
            attention.append(2**level)
    updown = True
    if levels > 1:
        updown = ins[per_level] == ["res"]
        if not updown and ins[per_level] != ["down"]:
            raise ConvertError(f"U-Net: input block {per_level} is neither a residual nor a conv downsampler")
    first_width = s["input_blocks.1.0.in_layers.2.weight"].shape[0]
    scale_shift = _need(s, "input_blocks.1.0.emb_layers.1.weight", what).shape[0] == 2 * first_width

    heads = dict(num_heads=fallback.num_heads, num_head_channels=fallback.num_head_channels,
                 num_heads_upsample=fallback.num_heads_upsample)
    new_order, dropout = fallback.use_new_attention_order, fallback.dropout
    root = weights.root
    if root is not None and root.qualname.endswith(".UNetModel"):
        attrs = root.state
        for key in heads:
            if isinstance(attrs.get(key), int):
                heads[key] = attrs[key]
        if isinstance(attrs.get("dropout"), (int, float)):
            dropout = float(attrs["dropout"])
        if attrs.get("num_classes") is not None:
            raise ConvertError("U-Net: class-conditional models (num_classes) are not BS-LDM's U-Net")
        if heads["num_heads_upsample"] == heads["num_heads"]:
            heads["num_heads_upsample"] = -1  # guided-diffusion stores its default (-1) resolved
        kinds = {m.qualname.rsplit(".", 1)[1] for m in weights.modules.values()}
        new_order = "QKVAttention" in kinds and "QKVAttentionLegacy" not in kinds
    else:
        logger.warning(
            "%s holds no pickled module: attention heads (num_heads=%d, num_head_channels=%d) and "
            "the attention variant are not stored in tensors, so they are taken from the config",
            weights.source, heads["num_heads"], heads["num_head_channels"],
        )
    return UNetConfig(
        in_channels=in_channels, out_channels=out_channels, model_channels=mc,
        channel_mult=tuple(mult), num_res_blocks=n_res, attention_resolutions=tuple(attention),
        use_scale_shift_norm=scale_shift, resblock_updown=updown,
        use_new_attention_order=new_order, dropout=dropout, **heads,
    )


def infer_vqgan(weights: Weights, fallback: VQGANConfig) -> VQGANConfig:
    """monai-generative `VQVAE` hyper-parameters from its tensors (and the pickled quantiser)."""
    s, what = vqgan_state(weights.state), "VQGAN"
    codebook = _need(s, "quantizer.embedding.weight", what)
    kinds = []
    for i in range(len(s)):
        if f"encoder.blocks.{i}.conv.weight" in s:
            kinds.append("conv")
        elif f"encoder.blocks.{i}.conv1.conv.weight" in s:
            kinds.append("res")
        else:
            break
    if len(kinds) < 2 or kinds[0] != "conv" or kinds[-1] != "conv":
        raise ConvertError("VQGAN: encoder.blocks do not form monai-generative's VQVAE encoder")
    stages: list[list[int]] = []  # block indices: [down conv, residual units...]
    for i, kind in enumerate(kinds[:-1]):
        if kind == "conv":
            stages.append([i])
        else:
            stages[-1].append(i)
    channels = tuple(s[f"encoder.blocks.{st[0]}.conv.weight"].shape[0] for st in stages)
    res_layers = {len(st) - 1 for st in stages}
    if len(res_layers) != 1:
        raise ConvertError(f"VQGAN: stages have different numbers of residual units {sorted(res_layers)}")
    n_res = res_layers.pop()
    res_channels = tuple(
        s[f"encoder.blocks.{st[1]}.conv1.conv.weight"].shape[0] if n_res else ch
        for st, ch in zip(stages, channels)
    )
    latent = s[f"encoder.blocks.{len(kinds) - 1}.conv.weight"].shape[0]
    last = max((int(m[1]) for k in s if (m := re.match(r"^decoder\.blocks\.(\d+)\.", k))), default=0)
    out_channels = _need(s, f"decoder.blocks.{last}.conv.weight", what).shape[1]
    if codebook.shape[1] != latent:
        raise ConvertError(f"VQGAN: codes of {codebook.shape[1]} channels for a {latent}-channel latent")
    training: dict[str, Any] = dict(commitment_cost=fallback.commitment_cost,
                                    ema_decay=fallback.ema_decay, ema_epsilon=fallback.ema_epsilon)
    quantizer = weights.modules.get("quantizer.quantizer")
    if quantizer is not None:
        for ours, theirs in (("commitment_cost", "commitment_cost"), ("ema_decay", "decay"),
                             ("ema_epsilon", "epsilon")):
            if isinstance(quantizer.state.get(theirs), (int, float)):
                training[ours] = float(quantizer.state[theirs])
    return VQGANConfig(
        in_channels=s["encoder.blocks.0.conv.weight"].shape[1], out_channels=out_channels,
        channels=channels, res_channels=res_channels, num_res_layers=n_res,
        num_embeddings=codebook.shape[0], embedding_dim=latent, **training,
    )


# --------------------------------------------------------------------------------------------
# checks


def check_tensors(module: nn.Module, state: dict[str, torch.Tensor], what: str, config_name: str,
                  file_names: dict[str, str] | None = None) -> None:
    """Every tensor the config's network needs, with its shape; each mismatch is named (by its
    name in the file, given `file_names`: ours -> theirs)."""
    expected = module.state_dict()
    names = file_names or {}

    def name(k: str) -> str:
        return f"{names[k]} (ours: {k})" if names.get(k, k) != k else k

    problems = [
        f"tensor {name(k)}: {what} has shape {tuple(state[k].shape)}, config '{config_name}' "
        f"expects {tuple(expected[k].shape)}"
        for k in expected if k in state and state[k].shape != expected[k].shape
    ]
    problems += [f"tensor {k} (shape {tuple(expected[k].shape)}) is missing from {what}"
                 for k in expected if k not in state]
    problems += [f"tensor {name(k)} (shape {tuple(state[k].shape)}) in {what} has no place in "
                 f"config '{config_name}'" for k in state if k not in expected]
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConvertError(f"{what} does not fit config '{config_name}':\n  {shown}{more}")


_LAYER_FIELDS = {
    nn.Conv1d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "padding_mode"),
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                "groups", "padding_mode"),
    nn.ConvTranspose2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                         "output_padding", "dilation", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_modules(modules: dict[str, PickledObject], ours: nn.Module, what: str, vqgan: bool) -> None:
    """Compare each pickled layer's hyper-parameters (strides, paddings, heads, activations, the
    resampling direction) with the layer at the same place in ours; no-op for state dicts."""
    if not modules:
        return
    mine = dict(ours.named_modules())
    problems: list[str] = []

    def short(obj: PickledObject) -> str:
        return obj.qualname.rsplit(".", 1)[1]

    for path, obj in modules.items():
        target = mine.get(_vqgan_path(path) if vqgan else path)
        attrs = obj.state
        kind = short(obj)
        fields = next((f for cls, f in _LAYER_FIELDS.items() if cls.__name__ == kind
                       or (cls is nn.GroupNorm and kind == "GroupNorm32")), None)
        if fields is not None:
            norms = ("GroupNorm", "GroupNorm32")
            if target is None or not (type(target).__name__ == kind
                                      or (kind in norms and type(target).__name__ in norms)):
                problems.append(f"{path}: pickled {kind} has no counterpart ({type(target).__name__})")
                continue
            for name in fields:
                if name in attrs and not _same(attrs[name], getattr(target, name)):
                    problems.append(f"{path}.{name}: {what} has {attrs[name]!r}, ours {getattr(target, name)!r}")
        elif kind == "AttentionBlock":
            children = {k: short(v) for k, v in attrs["_modules"].items() if v is not None}
            if not isinstance(target, AttentionBlock):
                problems.append(f"{path}: pickled AttentionBlock has no counterpart")
            else:
                if attrs.get("num_heads") != target.num_heads:
                    problems.append(f"{path}.num_heads: {what} has {attrs.get('num_heads')!r}, "
                                    f"ours {target.num_heads}")
                if (children.get("attention") == "QKVAttention") != target.new_order:
                    problems.append(f"{path}.attention: {what} uses {children.get('attention')}")
        elif kind == "ResBlock":
            children = {k: short(v) for k, v in attrs["_modules"].items() if v is not None}
            theirs = {"Upsample": "up", "Downsample": "down"}.get(children.get("h_upd", ""), "none")
            if not isinstance(target, ResBlock):
                problems.append(f"{path}: pickled ResBlock has no counterpart")
                continue
            own = "none" if not target.updown else ("up" if target.h_upd.up else "down")
            if theirs != own:
                problems.append(f"{path}: {what} resamples {theirs}, ours {own}")
            if attrs.get("use_scale_shift_norm", target.use_scale_shift_norm) != target.use_scale_shift_norm:
                problems.append(f"{path}.use_scale_shift_norm differs")
        elif kind == "Convolution" and vqgan:
            children = attrs["_modules"]
            adn = children.get("adn")
            acts = {k: short(v) for k, v in (adn.state["_modules"].items() if adn else ()) if v is not None}
            if set(acts) - {"A", "D"}:
                problems.append(f"{path}.adn: normalisation layers {sorted(acts)} are not in BS-LDM's VQGAN")
            relu = acts.get("A") == "ReLU"
            if "A" in acts and not relu:
                problems.append(f"{path}: activation {acts['A']} (BS-LDM's VQGAN uses ReLU)")
            if not isinstance(target, ConvBlock) or target.relu != relu:
                problems.append(f"{path}: {'ReLU' if relu else 'no activation'} in {what}, not in ours")
        elif kind in ("GELU", "LeakyReLU", "PReLU", "Tanh", "Sigmoid", "LayerNorm") or kind.startswith(
                ("BatchNorm", "InstanceNorm", "Conv3d", "ConvTranspose3d", "ConvTranspose1d")):
            problems.append(f"{path}: {kind} is not part of the BS-LDM networks")
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConvertError(f"{what}: the pickled network differs from ours:\n  {shown}{more}")
