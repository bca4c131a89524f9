"""Exponential moving average of weights, with torch_ema's semantics (as BS-LDM's `ldm_train.py`).

`torch_ema.ExponentialMovingAverage(params, decay)` uses `use_num_updates=True`: the effective
decay is min(decay, (1 + n) / (10 + n)) after n updates, so early averages are not stuck at init.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copies of a module's parameters; buffers are not averaged (torch_ema likewise)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = [p.detach().clone() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, module.parameters()):
            s.sub_((1.0 - decay) * (s - p.detach()))

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError("EMA state does not match the model's parameters")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
