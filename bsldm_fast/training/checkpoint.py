"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `<out>/checkpoints/step-NNNNNNNN/` holding `state.safetensors` and
`state.json` (the nested state with tensor references). It is written under a temporary name and
renamed into place, and `<out>/checkpoints/latest` (a one-line text file) is replaced atomically
afterwards, so a crash at any moment leaves the previous checkpoint intact and findable.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .._files import atomic_write

logger = logging.getLogger(__name__)

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LATEST = "latest"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able form of a nested state; tensors are moved into `tensors` and referenced by key."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, collections.Counter):
        return {"__counter__": [[_flatten(k, tensors), v] for k, v in obj.items()]}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        if "__counter__" in obj:
            return collections.Counter({_unflatten(k, tensors): v for k, v in obj["__counter__"]})
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
    return obj


def rng_state() -> dict[str, Any]:
    """Every global random state: Python, NumPy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: str | Path, name: str, state: dict[str, Any], keep: int = 0) -> Path:
    """Write checkpoint `name` under `folder` atomically, point `latest` at it, prune to `keep`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = {"format": FORMAT, "state": _flatten(state, tensors)}
    final = folder / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".part", dir=folder))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "bsldm_fast-checkpoint"})
        (tmp / STATE_JSON).write_text(json.dumps(tree))
        tmp.chmod(0o755)
        old = None
        if final.exists():
            # The same step saved again: move the old copy aside first, never delete before the
            # new one is in place.
            old = final.with_name(f".{name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(folder / LATEST, lambda f: Path(f).write_text(name + "\n"))
    if keep > 0:
        done = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in done[:-keep]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def _complete(path: Path) -> bool:
    return (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file()


def latest(folder: str | Path) -> Path | None:
    """The checkpoint `latest` points to; else the newest complete one; else None."""
    folder = Path(folder)
    pointer = folder / LATEST
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if _complete(path):
            return path
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and _complete(p))
    return found[-1] if found else None


def load(path: str | Path) -> dict[str, Any]:
    """The state saved by `save` (tensors on the CPU)."""
    path = Path(path)
    if not (path / STATE_JSON).is_file() or not (path / STATE_TENSORS).is_file():
        raise CheckpointError(f"{path} is not a checkpoint (expected {STATE_JSON} and {STATE_TENSORS})")
    tree = json.loads((path / STATE_JSON).read_text())
    if tree.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {tree['format']} is newer than this bsldm_fast")
    return _unflatten(tree["state"], load_file(str(path / STATE_TENSORS)))
