"""Training of the BS-LDM networks: the VQGAN, then the conditional LDM (`training/train.py`).

One code path from one process to many machines (torchrun + DistributedDataParallel); the result
is a model directory that `Suppressor.from_pretrained` loads.
"""

from ..modeldir import ModelDirError
from .checkpoint import CheckpointError
from .config import TrainConfig, make_config
from .data import DataError
from .perceptual import PerceptualWeightsError
from .trainer import train

USER_ERRORS = (DataError, ModelDirError, CheckpointError, PerceptualWeightsError, FileExistsError)
"""Errors that are the user's to fix (bad data folder, model, checkpoint, weights, or output path):
the command line prints their message instead of a traceback."""

__all__ = ["USER_ERRORS", "TrainConfig", "make_config", "train"]
