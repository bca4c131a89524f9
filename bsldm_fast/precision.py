"""Compute precisions, named once: every choice list (CLI, training, export, runners) reads these."""

from __future__ import annotations

import copy

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_of(precision: str) -> torch.dtype:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(PRECISIONS)}") from None


def on_device(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """The module on `device` in `dtype`, in eval mode; a copy when that needs a conversion, so the
    caller's model is never changed behind its back."""
    device = torch.device(device)
    param = next(module.parameters())
    if param.device != device or param.dtype != dtype:
        module = copy.deepcopy(module).to(device, dtype)
    return module.eval()
