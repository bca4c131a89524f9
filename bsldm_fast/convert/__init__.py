"""Safe conversion of the official BS-LDM checkpoints (whole pickled modules) into model directories.

`convert(unet, vqgan, output)` reads the authors' `torch.save(model)` files (or state dicts,
checkpoint dicts, safetensors) without importing or running the code they name, infers the
configuration from the tensors, and writes a model directory.
"""

from .checkpoint import CheckpointError, Weights, read_weights
from .converter import build_config, convert, load_checkpoints
from .infer import ConvertError, infer_unet, infer_vqgan
from .unpickler import PickledObject, UnsafeCheckpointError, load

__all__ = [
    "CheckpointError", "ConvertError", "PickledObject", "UnsafeCheckpointError", "Weights",
    "build_config", "convert", "infer_unet", "infer_vqgan", "load", "load_checkpoints",
    "read_weights",
]
