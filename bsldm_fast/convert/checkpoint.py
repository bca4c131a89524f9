"""The weights a checkpoint holds: a pickled whole module, a state dict, or a checkpoint dict.

Whatever the form, the result is a flat state dict (name -> tensor) plus, when the file held a
whole pickled module, that module's record tree, which knows what the tensors cannot tell
(attention heads, strides, the attention variant).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .unpickler import ParameterRecord, PickledObject, TensorRecord, UnsafeCheckpointError, load

logger = logging.getLogger(__name__)

STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
"""Keys under which checkpoint dicts commonly keep the trained weights."""
EMA_KEYS = ("ema", "ema_state_dict", "model_ema", "ema_model", "state_dict_ema")
"""Keys under which checkpoint dicts commonly keep the EMA weights."""


class CheckpointError(ValueError):
    """A checkpoint holds no weights we can find, or weights in a form we cannot map."""


@dataclass
class Weights:
    """Tensors by name, and the pickled module tree they came from (if the file held one)."""

    state: dict[str, torch.Tensor]
    source: str
    """The file and where in it the weights were found, for messages."""
    modules: dict[str, PickledObject] = field(default_factory=dict)
    """Every pickled sub-module by its dotted path ('' is the root); empty for state dicts."""

    @property
    def root(self) -> PickledObject | None:
        return self.modules.get("")


def _module_records(obj: PickledObject, where: str) -> tuple[dict[str, TensorRecord], dict[str, PickledObject]]:
    """The state-dict entries (parameters, persistent buffers) and sub-modules of a pickled module."""
    tensors: dict[str, TensorRecord] = {}
    modules: dict[str, PickledObject] = {}

    def walk(node: Any, path: str) -> None:
        state = node.state if isinstance(node, PickledObject) else None
        if not isinstance(state, dict) or not isinstance(state.get("_modules"), dict):
            raise CheckpointError(f"{where}: {path or 'the root'} is not a pickled torch module ({node!r})")
        modules[path] = node
        prefix = f"{path}." if path else ""
        skip = state.get("_non_persistent_buffers_set") or set()
        for group in ("_parameters", "_buffers"):
            entries = state.get(group) or {}
            if not isinstance(entries, dict):
                raise CheckpointError(f"{where}: {path or 'the root'}.{group} is not a dict")
            for name, value in entries.items():
                if value is None or (group == "_buffers" and name in skip):
                    continue
                if not isinstance(value, TensorRecord):
                    raise CheckpointError(f"{where}: {prefix}{name} is a {type(value).__name__}, not a tensor")
                tensors[prefix + name] = value
        for name, child in state["_modules"].items():
            if child is not None:
                walk(child, prefix + name)

    walk(obj, "")
    return tensors, modules


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and bool(obj)
            and all(isinstance(k, str) and isinstance(v, TensorRecord) for k, v in obj.items()))


def _strip_wrapper_prefix(state: dict[str, Any]) -> dict[str, Any]:
    # DataParallel / DistributedDataParallel and torch.compile prefix every name.
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _tensors(records: dict[str, TensorRecord]) -> dict[str, torch.Tensor]:
    # No copy: the records' storages are private buffers this reader allocated.
    return {k: v.tensor for k, v in records.items()}


def _from_value(value: Any, where: str) -> Weights | None:
    if isinstance(value, PickledObject):
        records, modules = _module_records(value, where)
        return Weights(_tensors(records), f"{where} (pickled {value.qualname})", modules)
    if _is_state_dict(value):
        return Weights(_tensors(_strip_wrapper_prefix(value)), f"{where} (state dict)")
    return None


def _from_torch_ema(ema: dict[str, Any], model: Any, where: str) -> Weights:
    """torch_ema's `ExponentialMovingAverage.state_dict()`: shadow copies of the trainable
    parameters in `model.parameters()` order, without names; the pickled model supplies them."""
    if not isinstance(model, PickledObject):
        raise CheckpointError(
            f"{where}: torch_ema shadow parameters have no names; they can be mapped only onto a "
            "whole pickled model stored beside them"
        )
    records, modules = _module_records(model, where)
    shadow = ema["shadow_params"]
    trainable = [k for k, v in records.items() if isinstance(v, ParameterRecord) and v.requires_grad]
    if not isinstance(shadow, list) or len(shadow) != len(trainable):
        raise CheckpointError(
            f"{where}: {len(shadow) if isinstance(shadow, list) else '?'} torch_ema shadow parameters "
            f"for {len(trainable)} trainable parameters"
        )
    state = _tensors(records)
    for name, value in zip(trainable, shadow):
        if not isinstance(value, TensorRecord) or value.tensor.shape != state[name].shape:
            raise CheckpointError(f"{where}: torch_ema shadow parameter for {name} does not match it")
        state[name] = value.tensor
    return Weights(state, f"{where} (torch_ema shadow parameters on pickled {model.qualname})", modules)


def read_weights(path: str | Path, ema: bool | None = None) -> Weights:
    """The weights in a checkpoint file, read safely (see `unpickler`).

    `ema`: None takes EMA weights when the file has them, True requires them, False ignores them.
    """
    where = str(path)
    obj = load(path)
    found = _from_value(obj, where)
    if found is not None:
        if ema:
            raise CheckpointError(f"{where} holds one set of weights and no separate EMA weights")
        return found
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not model weights")

    model_key = next((k for k in STATE_KEYS if k in obj), None)
    ema_key = next((k for k in EMA_KEYS if k in obj), None)
    if ema_key is not None and ema is not False:
        value = obj[ema_key]
        if isinstance(value, dict) and "shadow_params" in value:
            found = _from_torch_ema(value, obj.get(model_key) if model_key else None, f"{where}['{ema_key}']")
        else:
            found = _from_value(value, f"{where}['{ema_key}']")
        if found is None:
            raise CheckpointError(f"{where}['{ema_key}'] holds no recognisable EMA weights")
        logger.info("using the EMA weights in %s", found.source)
        return found
    if ema:
        raise CheckpointError(f"{where} holds no EMA weights (looked for {', '.join(EMA_KEYS)})")
    if model_key is not None:
        found = _from_value(obj[model_key], f"{where}['{model_key}']")
        if found is not None:
            return found
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    raise CheckpointError(
        f"{where}: no weights found. Expected a pickled model, a state dict, or a dict with one of "
        f"{', '.join(STATE_KEYS + EMA_KEYS)}; its keys are {keys}"
    )


__all__ = ["CheckpointError", "Weights", "read_weights", "UnsafeCheckpointError"]
